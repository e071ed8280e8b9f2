/* A small JSON parser for config.json, safetensors headers and the shard
 * index: the whole document becomes a tree of json_value nodes. */
#ifndef LLAMA_JSON_H
#define LLAMA_JSON_H

#include <stddef.h>

typedef enum json_type {
    JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT
} json_type;

typedef struct json_value json_value;
struct json_value {
    json_type type;
    double number;        /* JSON_NUMBER, JSON_BOOL (0/1) */
    char *string;         /* JSON_STRING (NUL-terminated, unescaped) */
    char **keys;          /* JSON_OBJECT: [count] */
    json_value *items;    /* JSON_ARRAY, JSON_OBJECT: [count] */
    size_t count;
};

/* Parses text[len]; on failure returns NULL with a message (position) in
 * err. Free with json_free. */
json_value *json_parse(const char *text, size_t len, char *err, size_t errlen);
void json_free(json_value *v);
/* The member named key of an object, or NULL. */
const json_value *json_get(const json_value *obj, const char *key);

#endif
