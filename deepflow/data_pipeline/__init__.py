"""Raw data -> encoded webdataset shards on object storage -> training batches."""
