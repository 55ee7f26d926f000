"""The amalgamation algorithm, pure torch, no Ray: one module per step of the method.

- ``capture``   : pre-activation tap features of frozen teachers (forward hooks by module path)
- ``amalgamate``: feature amalgamation, ``pca`` (closed form) and ``sgd`` (paper) auto-encoders
- ``student``   : the compact student of the teachers' topology
- ``stages``    : layer-wise learning, each stage an independent unit of work
- ``fold``      : folding each stage's FAM into the preceding layer
- ``joint``     : end-to-end training against the teachers' outputs
- ``calibrate`` : putting independent teachers' logits on one scale, without labels
- ``evaluate``  : task-aware and comprehensive accuracy, confusion, size and latency
"""
