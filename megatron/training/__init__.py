"""Our training driver on megatron-core: arguments and the run configuration, initialisation,
data, models, the optimizer, checkpoints, the loop.

``megatron`` itself is megatron-core's namespace package; this subpackage adds
``megatron.training`` to it (there is deliberately no ``megatron/__init__.py``).
"""


def pretrain(*args, **kwargs):
    """Entry point of pretrain_*.py (see :func:`megatron.training.training.pretrain`)."""
    from megatron.training.notices import quiet_known_notices

    quiet_known_notices()
    from megatron.training.training import pretrain as _pretrain

    return _pretrain(*args, **kwargs)
