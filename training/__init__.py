"""P-Tuning v2 training of prompt sets on a frozen base model (`promptserve train`)."""
