"""The driver room: specs, stages, tracking, the ``oodsweep`` CLI (docs/architecture.md "Rooms")."""
