"""API keys: what a key may do, how it is checked and cached, and the stores that hold keys.

A key comes from one of two stores, told apart by its shape:

- ``local`` (:mod:`.local_store`): the server's own keys, ``fai_...`` (:mod:`.key_format`),
  made with ``fictures-ai keys create`` in the server's database and stored as a keyed digest
  (:mod:`.hashing`);
- ``fictures`` (:mod:`.fictures_store`): the Fictures web app's keys, ``fic_...``, read from the
  web app's own PostgreSQL (``API_KEY_STORE=fictures``), bcrypt as the web app writes them.

Both are :class:`~.base.KeyStore`\\ s, which verify through the cache of :mod:`.cache` and say
what they found as the :mod:`.info` types; :mod:`.stores` opens them from the settings and asks
the one whose keys look like the presented key. Scopes and model allow-lists are
:mod:`.scopes`'. Callers import from the modules themselves.
"""
