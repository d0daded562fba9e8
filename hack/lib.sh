# Process and port helpers for hack/testbed.sh and hack/demo.sh (sourced, not run).
#
# A process *belongs to* a checkout when its command line or working directory names that
# checkout's .local/ directory (every testbed and demo process is started with a path in there).
# Only such processes are ever stopped, so the testbed of another checkout on the same machine,
# or anything else that happens to use a port, is named but left alone.

# pid_alive PID: the process exists and is not a zombie (a zombie holds no port and no file;
# in containers whose PID 1 does not reap, stopped processes linger as zombies).
pid_alive() {
  local state
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# describe_pid PID: "pid 123: python3 -c ..." (the command line, cut at 160 characters).
describe_pid() {
  local cmd
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | cut -c1-160) || true
  echo "pid $1: ${cmd:-(exited)}"
}

# belongs_to PID DIR: the command line or the working directory of PID names DIR/.
belongs_to() {
  local cwd
  tr '\0' '\n' 2>/dev/null <"/proc/$1/cmdline" | grep -qF "$2/" && return 0
  cwd=$(readlink "/proc/$1/cwd" 2>/dev/null) && [[ "$cwd/" == "$2"/* ]]
}

# port_taken PORT: something listens on TCP PORT (any local address: a listener on 0.0.0.0
# blocks 127.0.0.1 too).
if command -v ss >/dev/null; then
  port_taken() { [ -n "$(ss -H -ltn "sport = :$1" 2>/dev/null)" ]; }
  # port_pids PORT: the pids listening on PORT, one a line (none if this user may not see them).
  port_pids() { ss -H -ltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u; }
else
  port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
  port_pids() { :; }
fi

# port_holders PORT: who listens on PORT, for a message ("pid 123: cmd and pid 456: cmd").
port_holders() {
  local pid out=''
  for pid in $(port_pids "$1"); do out+="${out:+ and }$(describe_pid "$pid")"; done
  if [ -n "$out" ]; then
    echo "$out"
  elif command -v ss >/dev/null; then
    echo "a process this user cannot see"
  else
    echo "an unknown process (install iproute2's ss to see which)"
  fi
}

# ports_free PORT:WHAT...: succeed if every port is free, else print one line per taken port
# naming its holder, and fail.
ports_free() {
  local spec port taken=0
  for spec in "$@"; do
    port=${spec%%:*}
    port_taken "$port" || continue
    echo "  127.0.0.1:$port (${spec#*:}) is taken by $(port_holders "$port")" >&2
    taken=1
  done
  return $taken
}

# stop_pid PID [GRACE]: SIGTERM, then SIGKILL after GRACE seconds (default 10); returns once the
# process is gone (a zombie counts as gone).
stop_pid() {
  local pid=$1 grace=${2:-10} i
  pid_alive "$pid" || return 0
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 5; i++)); do pid_alive "$pid" || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do pid_alive "$pid" || return 0; sleep 0.2; done
  echo "pid $pid survived SIGKILL for 10 s" >&2
  return 1
}

# log_tail FILE [LINES] [OFFSET]: the last lines of a log written after byte OFFSET (what this
# run wrote, when the log keeps earlier runs), indented, for a failure message.
log_tail() {
  local file=$1 lines=${2:-15} offset=${3:-0}
  if [ "$(stat -c %s "$file" 2>/dev/null || echo 0)" -gt "$offset" ]; then
    echo "  last lines of $file:"
    tail -c +$((offset + 1)) "$file" | tail -n "$lines" | sed 's/^/    | /'
  else
    echo "  ($file has nothing new)"
  fi
}
