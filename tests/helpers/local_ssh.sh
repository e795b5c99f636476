#!/usr/bin/env bash
# Passwordless ssh from this machine to itself as "localhost" and "127.0.0.1", so the DeepSpeed launcher can start a
# two-"node" job over pdsh (tests/test_scale.py::test_deepspeed_hostfile_two_nodes_over_pdsh). Run as root, once:
#   apt-get install -y pdsh openssh-server openssh-client && bash tests/helpers/local_ssh.sh
set -euo pipefail
mkdir -p ~/.ssh /run/sshd
chmod 700 ~/.ssh
[[ -f ~/.ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519
grep -qxF "$(cat ~/.ssh/id_ed25519.pub)" ~/.ssh/authorized_keys 2>/dev/null || cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys
chmod 600 ~/.ssh/authorized_keys
ssh-keygen -A >/dev/null
pgrep -x sshd >/dev/null || /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password
for host in localhost 127.0.0.1; do
    ssh -o StrictHostKeyChecking=accept-new -o BatchMode=yes "$host" true
done
echo "ssh to localhost and 127.0.0.1 works"
