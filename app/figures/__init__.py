"""Pure builders of the explorer's plotly figures and pandas tables: llm-flow results in,
``go.Figure``/``pd.DataFrame`` out, no Streamlit, so each is checked without a browser.

The flow graph and the route diff are the core's (:mod:`llm_flow.io.figure`); here are the
panels' charts (:mod:`~app.figures.panels`), the tables (:mod:`~app.figures.tables`) and dataset
mode's heatmaps (:mod:`~app.figures.dataset`).
"""
