"""The bundled captioners, one run directory each (see tfcap.pretrained)."""
