"""The ``flywheel`` command: the composition root that starts and inspects every part."""
