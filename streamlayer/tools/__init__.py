"""The operator tools: ``python -m streamlayer demo | bench | doctor | inspect``.

They sit above the layers and import them; no layer imports a tool.
"""
