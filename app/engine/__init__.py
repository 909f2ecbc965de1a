"""The model loop: scheduler, model runner, sampling and detokenization. Never touches HTTP."""
