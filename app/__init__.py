"""promptserve: many P-Tuning v2 tasks served from one frozen Llama-family model."""
