"""D-Bus: how stock targetcli (and tcmu-runner) find our ``lazy`` TCMU handler."""
