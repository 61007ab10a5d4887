"""Triton kernels, installed as ``odelta_fast.kernels``.

One module per op family: the ``@triton.jit`` kernels, then the host launcher, then the
``torch.library`` registration. Nothing here knows about module names or delta methods;
``odelta_fast.ops`` is the only caller.
"""
