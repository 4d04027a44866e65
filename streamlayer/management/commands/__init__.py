"""``manage.py streamlayer_doctor`` and ``manage.py streamlayer_inspect``."""
