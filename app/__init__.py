"""The Streamlit explorer of llm-flow (``streamlit run app/main.py -- config/local.json``).

``main`` wires the views (:mod:`app.views`: sidebar, route tab, dataset tab) to the core
(``llm_flow``); :mod:`app.figures` builds their plotly figures and tables without Streamlit.
All caching lives in :mod:`app.cache` and all session state in :mod:`app.session`.
"""
