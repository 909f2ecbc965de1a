"""How classify and extract tasks turn text into model input and model output into answers.

Shared by the server and by training, so both encode a request exactly the same way.
"""
