"""Loss-term plugins (kind ``loss``): cross_entropy, max_z, z_loss."""
