"""Custom ops (torch.library, namespace ``l4``) introduced by passes."""
