"""DeepFlow platform: deeply supervised flow-based image generators, trained at scale."""
