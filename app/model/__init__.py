"""Finding, converting and loading the frozen base model."""
