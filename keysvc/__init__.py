"""keysvc: the key service (keystore, lifecycle, signing, audit log, daemon)."""
