"""The Streamlit explorer of llm-flow (``streamlit run app/main.py -- config/local.json``).

Views only: figures and panels wire llm-flow's core (``llm_flow``) to Streamlit; all caching and
session state lives in :mod:`app.state`.
"""
