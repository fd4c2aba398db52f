/*
 * blahvm's SPANK plugin: every srun task runs inside the job's guest.
 *
 * plugstack.conf:   required /etc/slurm/blahvm/blahvm_spank.so task=/etc/slurm/blahvm/task \
 *                       follow=/etc/slurm/blahvm/follow charge=/etc/slurm/blahvm/charge
 *
 * In slurmstepd, just before a task's command is executed (as the job's user), the task instead
 * becomes `TASK -- COMMAND ARGS`: blahvm's task wrapper, which runs the command in the job's guest
 * and exits with its exact code. Slurm 22.05 has no API to change a task's argv
 * (spank_prepend_task_argv came later), so the plugin execs the wrapper itself, with the task's
 * own environment.
 *
 * Left alone: the batch step (job_submit.lua already made the wrapper its interpreter), the
 * extern step (Slurm's own placeholder), and a task that already is `TASK ...`. Any failure fails
 * the task: it never falls back to running the command on the host.
 *
 * Suspension: Slurm suspends a job by stopping the processes it tracks, never the guest (libvirt's).
 * So, as root, just before each task drops its privileges, the plugin starts `FOLLOW JOBID PID`
 * (blahvm follow, optional): detached from the step (its own session, reparented to init) so that
 * Slurm never stops it with the job, it pauses the guest while the task is stopped and resumes it
 * with the task, and exits with it.
 *
 * Charging the guest to the job (optional, PrologFlags=Contain): when the job's extern step has
 * started its placeholder process (in the cgroups Slurm's cgroup plugins made for the job), the
 * plugin, as root in that step's slurmstepd, starts `CHARGE JOBID STEPD_PID` detached: it moves the
 * guest's QEMU into the placeholder's cgroups, so Slurm accounts, limits and freezes the guest as
 * the job's, and records the guest's usage until Slurm ends it with the job.
 *
 * Built per Slurm release by `blahvm install slurm` (the version is compiled in and checked by
 * Slurm when it loads the plugin).
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(blahvm, 1);

#define TASK_OPTION "task="
#define FOLLOW_OPTION "follow="
#define CHARGE_OPTION "charge="

static char task_path[PATH_MAX];
static char follow_path[PATH_MAX];
static char charge_path[PATH_MAX];

static int absolute_option(const char *arg, const char *option, char *into)
{
	const char *path = arg + strlen(option);

	if (path[0] != '/' || strlen(path) >= PATH_MAX) {
		slurm_error("blahvm: %s must be an absolute path: %s", option, path);
		return -1;
	}
	strcpy(into, path);
	return 0;
}

static int configure(int ac, char **av)
{
	int i;

	task_path[0] = '\0';
	follow_path[0] = '\0';
	charge_path[0] = '\0';
	for (i = 0; i < ac; i++) {
		if (strncmp(av[i], TASK_OPTION, strlen(TASK_OPTION)) == 0) {
			if (absolute_option(av[i], TASK_OPTION, task_path) < 0)
				return -1;
		} else if (strncmp(av[i], FOLLOW_OPTION, strlen(FOLLOW_OPTION)) == 0) {
			if (absolute_option(av[i], FOLLOW_OPTION, follow_path) < 0)
				return -1;
		} else if (strncmp(av[i], CHARGE_OPTION, strlen(CHARGE_OPTION)) == 0) {
			if (absolute_option(av[i], CHARGE_OPTION, charge_path) < 0)
				return -1;
		} else {
			slurm_error("blahvm: unknown plugstack.conf argument: %s", av[i]);
			return -1;
		}
	}
	if (task_path[0] == '\0') {
		slurm_error("blahvm: plugstack.conf must give task=/path/to/blahvm/task");
		return -1;
	}
	return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	/* srun, sbatch and salloc read plugstack.conf too: only slurmstepd needs the wrapper */
	if (!spank_remote(sp))
		return 0;
	return configure(ac, av);
}

/*
 * Start `HOOK JOBID PID` (follow or charge), detached: a new session, reparented to init (a double
 * fork), stdio on /dev/null, no other descriptor of slurmstepd's, an environment of its own with
 * nothing of the job's (the hook finds the job's entry in the host's ledger by its id).
 */
static void start_hook(char *hook, uint32_t job_id, pid_t task)
{
	char id[16], pid[16];
	char *argv[] = {hook, id, pid, NULL};
	char *envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", NULL};
	pid_t child;
	int status, fd;

	snprintf(id, sizeof(id), "%u", job_id);
	snprintf(pid, sizeof(pid), "%d", (int) task);
	child = fork();
	if (child < 0) {
		slurm_error("blahvm: cannot start %s: %m", hook);
		return;
	}
	if (child == 0) {
		setsid();
		if (fork() != 0)
			_exit(0);
		fd = open("/dev/null", O_RDWR);
		if (fd >= 0) {
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
		}
		for (fd = 3; fd < 65536; fd++)
			close(fd);
		execve(hook, argv, envp);
		_exit(127);
	}
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	uint32_t step, job_id;

	(void) ac;
	(void) av;
	if (follow_path[0] == '\0')
		return 0;
	if (spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS || step == SLURM_EXTERN_CONT)
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS) {
		slurm_error("blahvm: cannot tell this task's job: its guest is not paused with it");
		return 0;  /* the job still runs; only its suspension would not reach the guest */
	}
	start_hook(follow_path, job_id, getpid());
	return 0;
}

/*
 * The extern step (PrologFlags=Contain): called as root in its slurmstepd right after it forked its
 * placeholder and Slurm put that in the job's cgroups. The charge hook finds the placeholder as this
 * slurmstepd's child.
 */
int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
	uint32_t step, job_id;

	(void) ac;
	(void) av;
	if (charge_path[0] == '\0' || !spank_remote(sp))
		return 0;
	if (spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS || step != SLURM_EXTERN_CONT)
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS) {
		slurm_error("blahvm: cannot tell the extern step's job: its guest is not charged to it");
		return 0;  /* the job still runs; only Slurm's accounting and limits miss its guest */
	}
	start_hook(charge_path, job_id, getpid());
	return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	uint32_t step;
	int argc = 0, i;
	char **argv = NULL, **env = NULL;
	const char **wrapped;

	(void) ac;  /* the arguments were read by slurm_spank_init */
	(void) av;
	if (spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS) {
		slurm_error("blahvm: cannot tell which step this task belongs to");
		return -1;
	}
	if (step == SLURM_BATCH_SCRIPT || step == SLURM_EXTERN_CONT)
		return 0;
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || argc < 1) {
		slurm_error("blahvm: cannot read the task's command and environment");
		return -1;
	}
	if (strcmp(argv[0], task_path) == 0)
		return 0;  /* srun TASK -- COMMAND: already wrapped */

	wrapped = calloc((size_t) argc + 3, sizeof(*wrapped));
	if (wrapped == NULL) {
		slurm_error("blahvm: out of memory");
		return -1;
	}
	wrapped[0] = task_path;
	wrapped[1] = "--";
	for (i = 0; i < argc; i++)
		wrapped[i + 2] = argv[i];
	execve(task_path, (char *const *) wrapped, env);
	slurm_error("blahvm: cannot run the task wrapper %s: %m", task_path);
	free(wrapped);
	return -1;
}
