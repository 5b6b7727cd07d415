"""One module per benchmark section; ``bench.py`` runs them."""
