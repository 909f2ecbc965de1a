"""What the HTTP layer calls: task resolution, prompt encoding, generation, prompt-set uploads."""
