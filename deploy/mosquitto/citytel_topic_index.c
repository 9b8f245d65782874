/*
 * citytel's exact-topic ACL index for Mosquitto 2.1 (plugin API v5).
 *
 * Mosquitto's acl_file checks a login's topic rules one after another for every message it
 * delivers. A data-sharing client whose scope is one district reads one topic per Datastream of
 * that district, listed one by one (a topic filter cannot select by district: the Datastream's
 * id is one topic level), so each delivery scanned thousands of rules (docs/bench/live.md).
 * This plugin answers those checks with one hash lookup instead.
 *
 * Its file (rendered from the registry by processors/storage/logins.py, next to the ACL file):
 *
 *     prefix v1.1/              the topics the index decides, for the logins it lists
 *     user <login>              the exact topics this login may read follow, one per line
 *     v1.1/Datastreams('air-0001:pm2_5')/Observations
 *
 * For a listed login and a topic under the prefix: read is allowed if the topic is listed for
 * it, and refused otherwise (write, too: these logins only read). Everything else (other logins,
 * other topics, subscribing) is left to acl_file, which still holds the same rules. The file is
 * read at start and again on every reload (SIGHUP), as acl_file is.
 *
 * Build: cc -O2 -fPIC -shared -I<mosquitto>/include -I<mosquitto>/deps citytel_topic_index.c
 * Use:   plugin /path/citytel_topic_index.so
 *        plugin_opt_index_file /path/logins.acl.index
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mosquitto.h"
#include "uthash.h"

MOSQUITTO_PLUGIN_DECLARE_VERSION(5);

/* A login's topic: the key is "<login>\n<topic>" (neither may hold a newline). */
struct entry {
	UT_hash_handle hh;
	char key[];
};

/* A login the index decides for. */
struct login {
	UT_hash_handle hh;
	char name[];
};

struct index {
	struct entry *entries;
	struct login *logins;
	char *prefix;
	size_t prefix_length;
};

static mosquitto_plugin_id_t *plugin_id = NULL;
static char *index_file = NULL;
static struct index *current = NULL;

static void index_free(struct index *index)
{
	struct entry *entry, *next_entry;
	struct login *login, *next_login;

	if(index == NULL){
		return;
	}
	HASH_ITER(hh, index->entries, entry, next_entry){
		HASH_DEL(index->entries, entry);
		free(entry);
	}
	HASH_ITER(hh, index->logins, login, next_login){
		HASH_DEL(index->logins, login);
		free(login);
	}
	free(index->prefix);
	free(index);
}

static void strip(char *line)
{
	size_t length = strlen(line);
	while(length > 0 && (line[length - 1] == '\n' || line[length - 1] == '\r' || line[length - 1] == ' ')){
		line[--length] = '\0';
	}
}

/* The index in ``path``, or NULL (logged) if it cannot be read. */
static struct index *index_load(const char *path)
{
	FILE *file = fopen(path, "r");
	struct index *index;
	char *line = NULL;
	size_t capacity = 0;
	char *login = NULL;

	if(file == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "citytel_topic_index: cannot open %s", path);
		return NULL;
	}
	index = calloc(1, sizeof(*index));
	if(index == NULL){
		fclose(file);
		return NULL;
	}
	while(getline(&line, &capacity, file) != -1){
		strip(line);
		if(line[0] == '\0' || line[0] == '#'){
			continue;
		}
		if(strncmp(line, "prefix ", 7) == 0){
			free(index->prefix);
			index->prefix = strdup(line + 7);
			index->prefix_length = index->prefix ? strlen(index->prefix) : 0;
		}else if(strncmp(line, "user ", 5) == 0){
			struct login *found;
			size_t length = strlen(line + 5);
			free(login);
			login = strdup(line + 5);
			HASH_FIND(hh, index->logins, login, length, found);
			if(found == NULL && login != NULL){
				found = malloc(sizeof(*found) + length + 1);
				if(found == NULL){
					break;
				}
				memcpy(found->name, login, length + 1);
				HASH_ADD(hh, index->logins, name, length, found);
			}
		}else if(login != NULL){
			size_t length = strlen(login) + 1 + strlen(line);
			struct entry *entry = malloc(sizeof(*entry) + length + 1);
			struct entry *found;
			if(entry == NULL){
				break;
			}
			snprintf(entry->key, length + 1, "%s\n%s", login, line);
			HASH_FIND(hh, index->entries, entry->key, length, found);
			if(found == NULL){
				HASH_ADD(hh, index->entries, key, length, entry);
			}else{
				free(entry);
			}
		}
	}
	free(line);
	free(login);
	fclose(file);
	if(index->prefix == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "citytel_topic_index: %s has no prefix line", path);
		index_free(index);
		return NULL;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "citytel_topic_index: %u logins, %u topics under %s",
			HASH_COUNT(index->logins), HASH_COUNT(index->entries), index->prefix);
	return index;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *check = event_data;
	const char *username;
	struct login *login;
	struct entry *entry;
	size_t login_length, topic_length;
	char stack_key[512];
	char *key;

	(void)event;
	(void)userdata;
	if(current == NULL || check->access == MOSQ_ACL_SUBSCRIBE || check->access == MOSQ_ACL_UNSUBSCRIBE){
		return MOSQ_ERR_PLUGIN_IGNORE;
	}
	if(strncmp(check->topic, current->prefix, current->prefix_length) != 0){
		return MOSQ_ERR_PLUGIN_IGNORE;
	}
	username = mosquitto_client_username(check->client);
	if(username == NULL){
		return MOSQ_ERR_PLUGIN_IGNORE;
	}
	login_length = strlen(username);
	HASH_FIND(hh, current->logins, username, login_length, login);
	if(login == NULL){
		return MOSQ_ERR_PLUGIN_IGNORE;
	}
	if(check->access != MOSQ_ACL_READ){
		return MOSQ_ERR_ACL_DENIED;
	}
	topic_length = strlen(check->topic);
	key = login_length + 1 + topic_length < sizeof(stack_key) ? stack_key : malloc(login_length + topic_length + 2);
	if(key == NULL){
		return MOSQ_ERR_NOMEM;
	}
	memcpy(key, username, login_length);
	key[login_length] = '\n';
	memcpy(key + login_length + 1, check->topic, topic_length);
	HASH_FIND(hh, current->entries, key, login_length + 1 + topic_length, entry);
	if(key != stack_key){
		free(key);
	}
	return entry != NULL ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct index *fresh;

	(void)event;
	(void)event_data;
	(void)userdata;
	fresh = index_load(index_file);
	if(fresh == NULL){
		/* Unreadable: decide nothing rather than with stale rules; acl_file still applies. */
		index_free(current);
		current = NULL;
		return MOSQ_ERR_SUCCESS;
	}
	index_free(current);
	current = fresh;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options, int option_count)
{
	int rc;

	(void)userdata;
	plugin_id = identifier;
	mosquitto_plugin_set_info(identifier, "citytel-topic-index", "1.0");
	for(int i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "index_file") == 0){
			index_file = strdup(options[i].value);
		}
	}
	if(index_file == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "citytel_topic_index: plugin_opt_index_file is required");
		return MOSQ_ERR_INVAL;
	}
	current = index_load(index_file);
	if(current == NULL){
		return MOSQ_ERR_INVAL;
	}
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	if(rc){
		return rc;
	}
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	index_free(current);
	current = NULL;
	free(index_file);
	index_file = NULL;
	return MOSQ_ERR_SUCCESS;
}
