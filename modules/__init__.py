"""Model code of the streaming SSL recipes: encoders, context sampler, masker, quantizer."""
