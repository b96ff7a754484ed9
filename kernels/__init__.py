"""dora_verify.kernels: the production DoRA kernels (factored norm, fused compose forward/backward,
three-tier dispatch, DoRALinear, PEFT integration).

This package ships as ``dora_verify.kernels`` (pyproject maps the top-level ``kernels/`` folder to it);
no top-level module named ``kernels`` is installed. Its operators are under construction (issue
"Priority 2 — The production kernels"); until they land it exports nothing, and the toolkit certifies
the eager forms in ``dora_verify.forms``.
"""
__all__: list = []
