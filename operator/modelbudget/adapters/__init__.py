"""The operator's hands and eyes: one small Protocol per outside system, plus the real client.

Every adapter is synchronous (the kubernetes and prometheus clients are); the controller calls
them through ``asyncio.to_thread``.  Fakes for the Protocols live with the tests.
"""
