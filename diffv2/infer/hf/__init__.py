"""Remote-code templates that diffv2.infer.export_hf copies next to exported weights; the framework never imports them."""
