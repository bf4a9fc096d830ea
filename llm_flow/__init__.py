"""llm-flow: explore information-flow routes in transformer language models.

Ferrando & Voita 2024, "Information Flow Routes" (arXiv 2403.00824).
"""

__version__ = "0.1.0"
