"""Data selection and analysis from per-sample gradients: targeted selection (``gist``, its
baselines ``baselines``: LESS-style and random; the selectors as Stage II stream consumers,
``consumers``; ranking and budgets, ``ranking``; the ``gs-ray select`` command, ``select``),
G-SNR filtering with a LoRA ensemble (``gsnr``) and layer-wise gradient spectra (``spectra``)."""
