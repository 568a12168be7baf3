"""The driver room: specs, stages, tracking, the ``oodsweep`` CLI (DESIGN §2)."""
