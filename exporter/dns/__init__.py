"""Speaking DNS: the only package that does. `wire` builds queries and reads answers,
`engine` runs probes on sockets (`clock`: the kernel's timestamps), `stream` runs one
exchange over a byte stream."""
