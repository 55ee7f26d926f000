"""The teacher-feature store: sharded Parquet datasets, content-addressed, on local disk or S3.

Layout under a store root (every key is a fingerprint, so equal inputs share data)::

    outputs/<zoo fp>/<pool fp>/   teacher logits + per-shard PCA statistics (pass 1)
    codecs/<codec fp>/            the fitted auto-encoders (safetensors + JSON)
    codes/<codec fp>/<pool fp>/   images, teacher logits and compact codes at max width (pass 2)
"""
