"""ALBEF models: encoders (``vit``, ``bert``), the shared body (``albef``), losses and task models."""
