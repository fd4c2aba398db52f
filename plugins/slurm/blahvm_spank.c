/*
 * blahvm's SPANK plugin: every srun task runs inside the job's guest.
 *
 * plugstack.conf:   required /etc/slurm/blahvm/blahvm_spank.so task=/etc/slurm/blahvm/task
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
 * Built per Slurm release by `blahvm install slurm` (the version is compiled in and checked by
 * Slurm when it loads the plugin).
 */

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(blahvm, 1);

#define TASK_OPTION "task="

static char task_path[PATH_MAX];

static int configure(int ac, char **av)
{
	int i;

	task_path[0] = '\0';
	for (i = 0; i < ac; i++) {
		if (strncmp(av[i], TASK_OPTION, strlen(TASK_OPTION)) == 0) {
			const char *path = av[i] + strlen(TASK_OPTION);
			if (path[0] != '/' || strlen(path) >= sizeof(task_path)) {
				slurm_error("blahvm: task= must be an absolute path: %s", path);
				return -1;
			}
			strcpy(task_path, path);
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
