"""Work that outlives a request: durable jobs and batches (``store``, ``runner``), their files
on disk (``files``) and their signed webhooks (``webhooks``)."""
