"""flatten-lightning: FlattenGPT depth compression (arXiv 2602.08858) as a library.

This package holds the maths on tensors and Hugging Face modules and knows nothing of Lightning;
``callbacks/`` and ``train.py`` call it.
"""

__version__ = "0.1.0"
