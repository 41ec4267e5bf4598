"""fewstep client side: Python SDK (``fewstep.clients.python``) and load generator
(``fewstep.clients.bench``). Nothing here imports torch."""
