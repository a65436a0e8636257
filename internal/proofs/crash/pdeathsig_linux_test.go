package crash

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the kernel kill the server if the test process dies first (a test
// timeout, say), so that no server outlives its test holding a port and a data file.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
