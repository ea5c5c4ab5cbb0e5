"""Targeted data selection from the LoRA gradient stream: GIST (``gist``), its baselines
(``baselines``: LESS-style and random), the selectors as stream consumers (``consumers``), ranking
and budgets (``ranking``) and the ``gs-ray select`` command (``select``)."""
