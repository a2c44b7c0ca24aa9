"""The SGLang side: fleet launch/attach, the async client, weight sync, the staleness buffer."""
