"""The explorer's Streamlit views: the sidebar (:mod:`~app.views.controls`), the route tab
(:mod:`~app.views.route`: the graph with the panel beside it, :mod:`~app.views.panels`, the
contrast, :mod:`~app.views.contrast`, and the interventions, :mod:`~app.views.interventions`)
and the dataset tab (:mod:`~app.views.dataset`). They wire the core and :mod:`app.figures` to
widgets; results come from :mod:`app.cache`, state from :mod:`app.session`.
"""
