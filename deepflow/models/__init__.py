"""DeepFlow and SiT networks and the flow math. No I/O, no torch.distributed."""
