"""haina's built-in plugins, grouped by what they are: model components (``model``), loss terms
(``losses``), algorithms (``algorithms``), and the alignment helpers the algorithms share (``align``).

:mod:`haina.plugins.builtins` is haina's own entry point in the ``haina.plugins`` group: the registry
imports it the way it imports any third party's plugin package.
"""
