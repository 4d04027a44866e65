"""Django management commands (``"streamlayer"`` in ``INSTALLED_APPS``)."""
