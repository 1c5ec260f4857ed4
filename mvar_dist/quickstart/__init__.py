"""The quickstart: scikit-learn's digits as an image folder and a judge of generated digits, the
experiment it trains (built in code), and the chain of stages ``mvar-dist quickstart`` runs."""
