#!/bin/sh
# Run a command (the test suite) in a private network namespace when this user may make one (root):
# Ray's and Mooncake's servers listen on every interface, and in there every interface is the
# namespace's own: loopback, and one end of a veth pair (both ends in there) whose address the
# cluster-mode tests give their Ray nodes (DUALPATH_TEST_NODE_IP). Elsewhere the command runs as it is,
# and those tests skip.
if [ "$(id -u)" = 0 ] && [ -z "$DUALPATH_TEST_NODE_IP" ] && unshare -n true 2>/dev/null; then
    exec unshare -n sh -c '
        ip link set lo up &&
        ip link add dp-test0 type veth peer name dp-test1 &&
        ip addr add 10.77.0.1/24 dev dp-test0 &&
        ip link set dp-test0 up && ip link set dp-test1 up &&
        DUALPATH_TEST_NODE_IP=10.77.0.1 exec "$@"' sh "$@"
fi
exec "$@"
