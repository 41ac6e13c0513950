"""Federation algorithms: twinning, DCS, the stream protocol, keys, screening defenses, message codecs. No I/O."""
