-- pgcapture DDL capture in plain SQL and PL/pgSQL (no C extension), see docs/ddl.md.
--
-- Event triggers write one row per DDL statement into pgcapture.ddl_logs in the DDL's own
-- transaction, so the row travels through logical replication in order with the data changes
-- around it. The table has the shape of the Go pgcapture extension's; `query` is the text of
-- that one statement, for a replica to run as it is.
--
-- String literals here never hold a backslash outside E'' strings: function bodies are parsed
-- with the calling session's standard_conforming_strings, which may be off.
--
-- Safe to run again: functions are replaced, the event triggers are dropped first and created
-- last (so this script's own statements are never logged), the log table and rows are kept.

DROP EVENT TRIGGER IF EXISTS pgcapture_ddl_command_start;
DROP EVENT TRIGGER IF EXISTS pgcapture_sql_drop;
DROP EVENT TRIGGER IF EXISTS pgcapture_ddl_command_end;
-- signatures of earlier versions
DROP FUNCTION IF EXISTS pgcapture.write_log(jsonb, text, jsonb);
DROP FUNCTION IF EXISTS pgcapture.handle_failure(text, text, text);
DROP FUNCTION IF EXISTS pgcapture.prepared_query(text);

CREATE SCHEMA IF NOT EXISTS pgcapture;
-- Which version of this script is installed (the installer fills in a hash of the script).
COMMENT ON SCHEMA pgcapture IS 'pgcapture ddl capture @VERSION@';

CREATE TABLE IF NOT EXISTS pgcapture.ddl_logs (
    id serial PRIMARY KEY,
    query text,
    tags text[],
    activity jsonb
);

-- Key signing the triggers' per-session state (a custom setting, which any user can set): only
-- the owner can read it, so user code cannot forge state that would change what is logged.
CREATE TABLE IF NOT EXISTS pgcapture.ddl_state_key (k bytea NOT NULL);
REVOKE ALL ON pgcapture.ddl_state_key FROM PUBLIC;
INSERT INTO pgcapture.ddl_state_key (k)
SELECT sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'))
WHERE NOT EXISTS (SELECT FROM pgcapture.ddl_state_key);

-- Per-session register holding which statement of the client's query string runs now. A
-- sequence's session value (currval, set by setval) survives ROLLBACK, unlike settings and
-- rows, and statements rolled back inside a multi-statement string have still been run.
-- Unlogged where the server allows it (PostgreSQL 15+): it is per-session scratch space.
DO $do$
BEGIN
    IF current_setting('server_version_num')::int >= 150000 THEN
        CREATE UNLOGGED SEQUENCE IF NOT EXISTS pgcapture.ddl_statement_cursor;
    ELSE
        CREATE SEQUENCE IF NOT EXISTS pgcapture.ddl_statement_cursor;
    END IF;
END
$do$;

-- ---------------------------------------------------------------------------------------------
-- Statements: splitting query strings the way the server's scanner and parser do, and telling
-- from its leading keywords whether a statement fires event triggers.

-- One row per token of `sql`: kind is word (unquoted identifier or keyword; `word` is its
-- lower-case text), ident (double-quoted identifier; `word` is its unescaped name), string,
-- dollar, comment, param, number, op (one punctuation or operator character, in `word`) or
-- error (an unterminated string, identifier, comment or dollar quote running to the end).
-- first/last are 1-based character positions. Whitespace is not reported. The string is
-- scanned as an array of characters (text positions are not O(1) in multibyte encodings), in
-- one loop for speed on long migration scripts.
CREATE OR REPLACE FUNCTION pgcapture.lex(sql text)
RETURNS TABLE (kind text, first int, last int, word text)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    c text[] := string_to_array(sql, NULL);
    n int := coalesce(array_length(c, 1), 0);
    i int := 1;
    ch text;
    cp int;
    depth int;
    delim text;
    p int;
    -- with standard_conforming_strings off, '...' strings treat backslash as an escape
    bs boolean := current_setting('standard_conforming_strings') = 'off';
    quoted boolean;
    nl boolean;
BEGIN
    WHILE i <= n LOOP
        ch := c[i];
        IF ch IN (' ', E'\t', E'\n', E'\r', E'\f', E'\x0B') THEN
            i := i + 1;
            CONTINUE;
        END IF;
        first := i;
        word := NULL;
        kind := NULL;
        cp := ascii(ch);
        quoted := false;
        IF ch = '-' AND c[i + 1] = '-' THEN
            kind := 'comment';
            WHILE i <= n AND c[i] NOT IN (E'\n', E'\r') LOOP
                i := i + 1;
            END LOOP;
        ELSIF ch = '/' AND c[i + 1] = '*' THEN
            -- block comments nest, as in PostgreSQL's scanner
            kind := 'error';
            depth := 1;
            i := i + 2;
            WHILE i <= n LOOP
                IF c[i] = '/' AND c[i + 1] = '*' THEN
                    depth := depth + 1;
                    i := i + 2;
                ELSIF c[i] = '*' AND c[i + 1] = '/' THEN
                    depth := depth - 1;
                    i := i + 2;
                    IF depth = 0 THEN
                        kind := 'comment';
                        EXIT;
                    END IF;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
        ELSIF ch = '''' OR (c[i + 1] = '''' AND ch IN ('e', 'E', 'b', 'B', 'x', 'X', 'n', 'N'))
              OR (ch IN ('u', 'U') AND c[i + 1] = '&' AND c[i + 2] = '''') THEN
            -- E'' always takes backslash escapes, B'' X'' U&'' never, '' and N'' when
            -- standard_conforming_strings is off; '' inside is a quote in all of them
            quoted := ch IN ('e', 'E') OR (bs AND ch IN ('''', 'n', 'N'));
            i := i + CASE WHEN ch = '''' THEN 1 WHEN ch IN ('u', 'U') THEN 3 ELSE 2 END;
            LOOP
                kind := 'error';
                WHILE i <= n LOOP
                    IF quoted AND c[i] = E'\\' THEN
                        i := i + 2;
                    ELSIF c[i] = '''' THEN
                        i := i + 1;
                        IF c[i] IS DISTINCT FROM '''' THEN
                            kind := 'string';
                            EXIT;
                        END IF;
                        i := i + 1;
                    ELSE
                        i := i + 1;
                    END IF;
                END LOOP;
                EXIT WHEN kind = 'error';
                -- 'a' <whitespace with a newline, maybe -- comments> 'b' is one literal whose
                -- second part is read like the first (scan.l: quotecontinue)
                p := i;
                nl := false;
                LOOP
                    IF c[p] IN (' ', E'\t', E'\f') THEN
                        p := p + 1;
                    ELSIF c[p] IN (E'\n', E'\r') THEN
                        nl := true;
                        p := p + 1;
                    ELSIF c[p] = '-' AND c[p + 1] = '-' THEN
                        WHILE p <= n AND c[p] NOT IN (E'\n', E'\r') LOOP
                            p := p + 1;
                        END LOOP;
                    ELSE
                        EXIT;
                    END IF;
                END LOOP;
                EXIT WHEN NOT nl OR c[p] IS DISTINCT FROM '''';
                i := p + 1;
            END LOOP;
        ELSIF ch = '"' OR (ch IN ('u', 'U') AND c[i + 1] = '&' AND c[i + 2] = '"') THEN
            i := i + CASE WHEN ch = '"' THEN 1 ELSE 3 END;
            kind := 'error';
            WHILE i <= n LOOP
                IF c[i] = '"' THEN
                    i := i + 1;
                    IF c[i] IS DISTINCT FROM '"' THEN
                        kind := 'ident';
                        EXIT;
                    END IF;
                END IF;
                word := coalesce(word, '') || c[i];
                i := i + 1;
            END LOOP;
        ELSIF ch = '$' THEN
            -- $tag$ opens a dollar quote closed by the first later $tag$; $1 is a parameter
            p := i + 1;
            delim := '$';
            WHILE p <= n AND (ascii(c[p]) >= 128 OR c[p] ~ '[A-Za-z0-9_]') LOOP
                delim := delim || c[p];
                p := p + 1;
            END LOOP;
            IF c[p] = '$' AND (p = i + 1 OR c[i + 1] !~ '[0-9]') THEN
                delim := delim || '$';
                depth := strpos(substr(sql, p + 1), delim);
                IF depth = 0 THEN
                    kind := 'error';
                    i := n + 1;
                ELSE
                    kind := 'dollar';
                    i := p + depth + length(delim);
                END IF;
            ELSIF c[i + 1] ~ '[0-9]' THEN
                kind := 'param';
                i := i + 1;
                WHILE i <= n AND c[i] ~ '[0-9]' LOOP
                    i := i + 1;
                END LOOP;
            ELSE
                kind := 'op';
                word := '$';
                i := i + 1;
            END IF;
        ELSIF cp >= 128 OR cp = 95 OR (cp BETWEEN 65 AND 90) OR (cp BETWEEN 97 AND 122) THEN
            kind := 'word';
            word := ch;
            i := i + 1;
            WHILE i <= n LOOP
                cp := ascii(c[i]);
                EXIT WHEN NOT (cp >= 128 OR cp = 95 OR cp = 36 OR (cp BETWEEN 48 AND 57)
                               OR (cp BETWEEN 65 AND 90) OR (cp BETWEEN 97 AND 122));
                word := word || c[i];
                i := i + 1;
            END LOOP;
            word := lower(word COLLATE "C");  -- ASCII only, like the scanner
        ELSIF cp BETWEEN 48 AND 57 THEN
            kind := 'number';
            WHILE i <= n AND ascii(c[i]) BETWEEN 48 AND 57 LOOP
                i := i + 1;
            END LOOP;
        ELSE
            kind := 'op';
            word := ch;
            i := i + 1;
        END IF;
        IF kind = 'error' THEN
            i := n + 1;
        END IF;
        last := least(i, n + 1) - 1;
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- The statements of a query string as (first, last) character positions, like the server's
-- raw parser: a statement starts at its first token (comments before it belong to no
-- statement) and runs to the character before its terminating semicolon or the end of the
-- string, without trailing whitespace. PostgreSQL's grammar has a semicolon in exactly three
-- places: between statements, between the actions of CREATE RULE ... DO ( a; b ) (inside
-- parentheses), and after each statement of a BEGIN ATOMIC ... END body of CREATE [OR
-- REPLACE] FUNCTION/PROCEDURE (gram.y: stmtmulti, RuleActionMulti, routine_body_stmt_list).
-- So a semicolon ends a statement only outside parentheses and BEGIN ATOMIC bodies. Such a
-- body ends at the END that follows its ATOMIC or one of its semicolons directly: the END of
-- a CASE follows an expression, and END right after an expression is a column label
-- (`SELECT 1 end`); a body statement may not start with END (TransactionStmtLegacy is not
-- allowed there). Bodies nest (a CREATE FUNCTION inside a body).
CREATE OR REPLACE FUNCTION pgcapture.statement_spans(sql text)
RETURNS TABLE (first int, last int)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t record;
    w text;                    -- the token: a word in lower case, '"' || name, an operator, <kind>
    lead text[] := '{}';       -- the first four tokens of the (innermost) statement
    depth int := 0;            -- parenthesis depth
    atomic int := 0;           -- depth of BEGIN ATOMIC bodies
    prev text;                 -- the previous token (';' or '<atomic>' at a body statement's start)
BEGIN
    first := NULL;
    FOR t IN SELECT * FROM pgcapture.lex(sql) AS l WHERE l.kind <> 'comment' LOOP
        w := CASE t.kind WHEN 'word' THEN t.word WHEN 'op' THEN t.word
                         WHEN 'ident' THEN '"' || t.word ELSE '<' || t.kind || '>' END;
        IF w = ';' AND depth = 0 THEN
            IF atomic = 0 THEN
                IF first IS NOT NULL THEN
                    last := t.first - 1;
                    RETURN NEXT;
                END IF;
                first := NULL;
                prev := NULL;
            ELSE
                prev := ';';
            END IF;
            lead := '{}';
            CONTINUE;
        END IF;
        first := coalesce(first, t.first);
        IF cardinality(lead) < 4 THEN
            lead := lead || w;
        END IF;
        IF w = '(' THEN
            depth := depth + 1;
        ELSIF w = ')' THEN
            depth := greatest(depth - 1, 0);
        ELSIF depth = 0 AND atomic > 0 AND w = 'end' AND prev IN (';', '<atomic>') THEN
            atomic := atomic - 1;
        ELSIF depth = 0 AND w = 'atomic' AND prev = 'begin' AND lead[1] = 'create'
              AND (lead[2] IN ('function', 'procedure')
                   OR (lead[2:3] = '{or,replace}' AND lead[4] IN ('function', 'procedure'))) THEN
            atomic := atomic + 1;
            lead := '{}';
            w := '<atomic>';
        END IF;
        prev := w;
    END LOOP;
    IF first IS NOT NULL THEN
        last := length(sql);
        RETURN NEXT;
    END IF;
END
$fn$;

-- The statements of `sql` with their positions; `body` is the text without the semicolon and
-- trailing whitespace. Pure-ASCII strings are cut as bytes, which avoids substr's walk from the
-- start of the string for every statement of a long script.
CREATE OR REPLACE FUNCTION pgcapture.statements(sql text)
RETURNS TABLE (first int, last int, body text)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT s.first, s.first + length(b.body) - 1, b.body
    FROM pgcapture.statement_spans(sql) AS s,
         (SELECT octet_length(sql) = length(sql) AS ascii, convert_to(sql, 'UTF8') AS bytes) AS a,
         LATERAL (SELECT rtrim(CASE WHEN a.ascii
                                   THEN convert_from(substring(a.bytes FROM s.first
                                                               FOR s.last - s.first + 1), 'UTF8')
                                   ELSE substr(sql, s.first, s.last - s.first + 1) END,
                               E' \t\n\r\f\x0B') AS body) AS b
    ORDER BY s.first
$fn$;

-- The statements of `sql`, trimmed and without their semicolons: for a valid query string, the
-- statements the server's parser finds (pgcapture.capture.ddl.split_statements in Python).
CREATE OR REPLACE FUNCTION pgcapture.split_statements(sql text)
RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(array_agg(s.body ORDER BY s.first), '{}') FROM pgcapture.statements(sql) AS s
$fn$;

-- The significant tokens of a statement, for keyword matching: words in lower case, quoted
-- identifiers as '"' || name, operator characters as themselves, other tokens as <kind>; and
-- the parenthesis depth of each.
CREATE OR REPLACE FUNCTION pgcapture.statement_words(stmt text, OUT words text[], OUT depths int[])
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t record;
    depth int := 0;
BEGIN
    words := '{}';
    depths := '{}';
    FOR t IN SELECT * FROM pgcapture.lex(stmt) AS l WHERE l.kind <> 'comment' LOOP
        IF t.kind = 'op' AND t.word = ')' THEN
            depth := depth - 1;
        END IF;
        words := words || CASE t.kind WHEN 'word' THEN t.word WHEN 'op' THEN t.word
                                      WHEN 'ident' THEN '"' || t.word
                                      ELSE '<' || t.kind || '>' END;
        depths := depths || depth;
        IF t.kind = 'op' AND t.word = '(' THEN
            depth := depth + 1;
        END IF;
    END LOOP;
END
$fn$;

-- Position in `words` of the INTO of a SELECT ... INTO (outside parentheses, in the main
-- SELECT, after any WITH list), or NULL.
CREATE OR REPLACE FUNCTION pgcapture.select_into_at(words text[], depths int[])
RETURNS int
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    main text;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(words), 0) LOOP
        CONTINUE WHEN depths[i] <> 0;
        IF main IS NULL AND words[i] IN ('select', 'insert', 'update', 'delete', 'merge',
                                         'values', 'table') THEN
            main := words[i];
        ELSIF main = 'select' AND words[i] = 'into' THEN
            RETURN i;
        END IF;
        EXIT WHEN main <> 'select';
    END LOOP;
    RETURN NULL;
END
$fn$;

-- The start of the command tag the server fires event triggers with for `stmt` ('CREATE TABLE'
-- for CREATE [TEMP] TABLE and CREATE TABLE AS, 'GRANT', 'SELECT INTO', ...), or NULL when the
-- statement fires none. PostgreSQL 15 fires them for DDL on objects that live in the database:
-- not for databases, roles, tablespaces, parameters and event triggers (global objects or
-- triggers themselves), ALTER SYSTEM, role grants, nor for utility commands that are not DDL
-- (VACUUM, TRUNCATE, LOCK, EXPLAIN, EXECUTE, SET, ...). The integration tests check every rule
-- against the server.
CREATE OR REPLACE FUNCTION pgcapture.ddl_tag_prefix(stmt text)
RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    sw record := pgcapture.statement_words(stmt);
    w text[] := sw.words;
    i int := 2;
    global_objects text[] := '{database,role,group,tablespace,event,system,parameter}';
BEGIN
    CASE w[1]
    WHEN 'create', 'alter', 'drop' THEN
        -- modifiers between the verb and the object type, as in CREATE OR REPLACE TRUSTED
        -- PROCEDURAL LANGUAGE or CREATE UNIQUE INDEX
        WHILE w[i] = 'procedural' OR (w[1] = 'create' AND w[i] IN (
                'or', 'replace', 'global', 'local', 'temp', 'temporary', 'unlogged', 'unique',
                'trusted', 'default', 'constraint', 'recursive')) LOOP
            i := i + 1;
        END LOOP;
        IF w[i] = ANY (global_objects)
           OR (w[i] = 'user' AND w[i + 1] IS DISTINCT FROM 'mapping') THEN
            RETURN NULL;
        END IF;
        RETURN upper((w[1] || ' ' || w[i]) COLLATE "C");
    WHEN 'comment', 'security' THEN
        -- COMMENT ON <type> ..., SECURITY LABEL [FOR provider] ON <type> ...
        i := array_position(w, 'on');
        RETURN CASE WHEN w[i + 1] = ANY (global_objects) THEN NULL
                    WHEN w[1] = 'comment' THEN 'COMMENT' ELSE 'SECURITY LABEL' END;
    WHEN 'grant', 'revoke' THEN
        -- privileges ON objects fire; role grants (no ON before TO/FROM) do not
        FOR i IN 2 .. cardinality(w) LOOP
            CONTINUE WHEN sw.depths[i] <> 0 OR w[i] NOT IN ('on', 'to', 'from');
            RETURN CASE WHEN w[i] = 'on' AND NOT w[i + 1] = ANY (global_objects)
                        THEN upper(w[1] COLLATE "C") END;
        END LOOP;
        RETURN NULL;
    WHEN 'import' THEN
        RETURN 'IMPORT FOREIGN';
    WHEN 'refresh' THEN
        RETURN 'REFRESH MATERIALIZED';
    WHEN 'select', 'with' THEN
        RETURN CASE WHEN pgcapture.select_into_at(sw.words, sw.depths) IS NOT NULL
                    THEN 'SELECT INTO' END;
    WHEN 'execute' THEN
        RETURN pgcapture.execute_tag_prefix(stmt, NULL);
    ELSE
        RETURN NULL;
    END CASE;
END
$fn$;

-- The tag prefix of `EXECUTE name ...`: 'SELECT INTO' when the prepared statement is a
-- SELECT ... INTO (the only DDL that PREPARE takes), else NULL. `before`: see prepared_query.
CREATE OR REPLACE FUNCTION pgcapture.execute_tag_prefix(stmt text, before int)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN CASE WHEN pgcapture.ddl_tag_prefix(pgcapture.prepared_query(stmt, before))
                     = 'SELECT INTO' THEN 'SELECT INTO' END;
END
$fn$;

-- Whether the server fires event triggers for the statement `stmt` (see ddl_tag_prefix).
CREATE OR REPLACE FUNCTION pgcapture.fires_ddl_trigger(stmt text)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pgcapture.ddl_tag_prefix(stmt) IS NOT NULL
$fn$;

-- Whether a statement starting with tag prefix `prefix` is one the server reports as `tag`.
CREATE OR REPLACE FUNCTION pgcapture.tag_matches(prefix text, tag text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(tag = prefix OR starts_with(tag, prefix || ' '), false)
$fn$;

-- Whether the statement creates or alters a temporary relation, judged from its text: CREATE
-- TEMP/TEMPORARY ..., SELECT ... INTO TEMP ..., a target qualified with pg_temp, or an
-- unqualified table, view or sequence created while `temp_first` (the creation schema is the
-- session's temporary schema, search_path starting with pg_temp).
CREATE OR REPLACE FUNCTION pgcapture.names_temp_relation(stmt text, temp_first boolean)
RETURNS boolean
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    sw record := pgcapture.statement_words(stmt);
    w text[] := sw.words;
    verb text := coalesce(sw.words[1], '');
    i int := 2;
    kind text;
BEGIN
    IF verb IN ('select', 'with') THEN
        i := pgcapture.select_into_at(sw.words, sw.depths) + 1;
        kind := 'table';
    ELSIF verb NOT IN ('create', 'alter') THEN
        RETURN false;
    END IF;
    IF i IS NULL THEN
        RETURN false;  -- a SELECT without INTO
    END IF;
    -- CREATE [OR REPLACE] [GLOBAL | LOCAL] [TEMP | TEMPORARY | UNLOGGED] [RECURSIVE] <type>,
    -- INTO [GLOBAL | LOCAL] [TEMP | TEMPORARY | UNLOGGED] [TABLE]
    WHILE verb <> 'alter' AND w[i] IN ('or', 'replace', 'global', 'local', 'temp', 'temporary',
                                        'unlogged', 'recursive') LOOP
        IF w[i] IN ('temp', 'temporary') THEN
            RETURN true;
        END IF;
        i := i + 1;
    END LOOP;
    IF verb IN ('create', 'alter') THEN
        kind := w[i];
        i := i + CASE WHEN kind IN ('materialized', 'foreign') THEN 2 ELSE 1 END;
    ELSIF w[i] = 'table' THEN
        i := i + 1;
    END IF;
    WHILE w[i] IN ('if', 'not', 'exists', 'only') LOOP
        i := i + 1;
    END LOOP;
    IF w[i + 1] = '.' THEN
        RETURN ltrim(w[i], '"') ~ '^pg_temp(_[0-9]+)?$';
    END IF;
    RETURN coalesce(verb <> 'alter' AND kind IN ('table', 'view', 'sequence') AND temp_first,
                    false);
END
$fn$;

-- Whether unqualified CREATE TABLE/VIEW/SEQUENCE would create a temporary relation with the
-- search path `path`: the first entry naming pg_temp or an existing schema is pg_temp.
CREATE OR REPLACE FUNCTION pgcapture.creates_in_temp_schema(path text)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce((
        SELECT e.name = 'pg_temp'
        FROM regexp_split_to_table(path, ',') WITH ORDINALITY AS p(entry, n),
             LATERAL (SELECT btrim(p.entry) AS item) AS t,
             LATERAL (SELECT CASE WHEN t.item ~ '^".*"$'
                                  THEN replace(substr(t.item, 2, length(t.item) - 2), '""', '"')
                                  ELSE lower(t.item COLLATE "C") END AS raw) AS r,
             LATERAL (SELECT CASE WHEN r.raw = '$user' THEN session_user::text
                                  WHEN r.raw ~ '^pg_temp(_[0-9]+)?$' THEN 'pg_temp'
                                  ELSE r.raw END AS name) AS e
        WHERE e.name = 'pg_temp' OR EXISTS (SELECT FROM pg_namespace WHERE nspname = e.name)
        ORDER BY p.n
        LIMIT 1), false)
$fn$;

-- Whether the lexer finds an unterminated token in `sql`.
CREATE OR REPLACE FUNCTION pgcapture.lexes_unterminated(sql text)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT EXISTS (SELECT FROM pgcapture.lex(sql) AS l WHERE l.kind = 'error')
$fn$;

-- How the DDL was reached, from the PG_CONTEXT of an event trigger function: the innermost
-- frame below the function's own (first) line. kind is 'top' (no frame: a statement of the
-- client's query string), 'statement' (`SQL statement "<body>"`, added by SPI: PL/pgSQL and
-- other languages, DO blocks, EXECUTE, and commands like REFRESH MATERIALIZED VIEW
-- CONCURRENTLY), 'sqlfunction' (`SQL function "<fname>" statement <stmt_no>`) or 'unknown'.
-- The statement text is not escaped, so its end is the first `"` + newline followed by a frame
-- header where the text before it lexes completely, or the end of the context; `clean` is
-- false when neither holds.
CREATE OR REPLACE FUNCTION pgcapture.innermost_frame(
    ctx text, OUT kind text, OUT body text, OUT fname text, OUT stmt_no int, OUT clean boolean)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rest text := substr(ctx, strpos(ctx, E'\n') + 1);
    s text;
    k int;
    at int := 0;
    m text[];
BEGIN
    clean := true;
    IF strpos(ctx, E'\n') = 0 OR rest = '' THEN
        kind := 'top';
    ELSIF starts_with(rest, 'SQL statement "') THEN
        kind := 'statement';
        s := substr(rest, 16);
        LOOP
            k := strpos(substr(s, at + 1), E'"\n');
            EXIT WHEN k = 0;
            at := at + k;
            IF substr(s, at + 2) ~ '^(PL/pgSQL function |SQL (statement|function) "|PL/[A-Za-z]+ )'
               AND NOT pgcapture.lexes_unterminated(left(s, at - 1)) THEN
                body := left(s, at - 1);
                RETURN;
            END IF;
        END LOOP;
        clean := right(s, 1) = '"' AND NOT pgcapture.lexes_unterminated(left(s, -1));
        body := CASE WHEN right(s, 1) = '"' THEN left(s, -1) ELSE s END;
    ELSE
        m := regexp_match(rest, E'^SQL function "(.*?)" statement ([0-9]+)(\n|$)');
        kind := CASE WHEN m IS NULL THEN 'unknown' ELSE 'sqlfunction' END;
        fname := m[1];
        stmt_no := m[2]::int;
        body := split_part(rest, E'\n', 1);
    END IF;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Trigger state. A DDL statement fires ddl_command_start, maybe sql_drop, then
-- ddl_command_end; statements run inside it (an extension's script, the temporary tables of
-- REFRESH MATERIALIZED VIEW CONCURRENTLY, DDL in functions it calls) fire theirs in between.
-- The state is a stack of the statements whose start fired and end has not ("open"), caches
-- for the current client message, and cursors into multi-statement texts run by EXECUTE. It is
-- a session setting, so it survives COMMIT inside a multi-statement string and is undone with
-- the (sub)transaction of a failing statement, and it is signed (see ddl_state_key).

-- Identifies the client message being executed: backend, statement_timestamp() (the same for
-- all statements of one query string) and the query string's md5.
CREATE OR REPLACE FUNCTION pgcapture.message_key()
RETURNS text
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT format('%s:%s:%s', pg_backend_pid(),
                  (extract(epoch FROM statement_timestamp()) * 1000000)::bigint,
                  md5(coalesce(current_query(), '')))
$fn$;

CREATE OR REPLACE FUNCTION pgcapture.state_sign(payload text)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT encode(sha256(k || sha256(k || convert_to(payload, 'UTF8'))), 'hex')
    FROM pgcapture.ddl_state_key
    LIMIT 1
$fn$;

-- The state for the current message; a fresh one when the stored state belongs to another
-- message or its signature does not verify.
CREATE OR REPLACE FUNCTION pgcapture.state_load()
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v text := current_setting('pgcapture.ddl_state', true);
    msg text := pgcapture.message_key();
    st jsonb;
BEGIN
    IF length(v) > 64 AND left(v, 64) = pgcapture.state_sign(substr(v, 65)) THEN
        st := substr(v, 65)::jsonb;
        IF st ->> 'msg' = msg THEN
            RETURN st;
        END IF;
    END IF;
    RETURN jsonb_build_object('msg', msg, 'open', '[]'::jsonb, 'nested', '{}'::jsonb);
END
$fn$;

CREATE OR REPLACE FUNCTION pgcapture.state_save(st jsonb)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT set_config('pgcapture.ddl_state', pgcapture.state_sign(st::text) || st::text, false);
$fn$;

-- Index (0-based, among the statements of the query string) of the statement of message `msg`
-- that fired last, or -1. The register holds a 31-bit hash of the message and the index.
CREATE OR REPLACE FUNCTION pgcapture.top_cursor(msg text)
RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v bigint;
BEGIN
    BEGIN
        v := currval('pgcapture.ddl_statement_cursor');
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        RETURN -1;  -- never set in this session
    END;
    IF v >> 32 = hashtextextended(msg, 0) & 2147483647 THEN
        RETURN (v & 4294967295)::int - 1;
    END IF;
    RETURN -1;
END
$fn$;

CREATE OR REPLACE FUNCTION pgcapture.top_cursor_set(msg text, pos int)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT setval('pgcapture.ddl_statement_cursor',
                  ((hashtextextended(msg, 0) & 2147483647) << 32) | (pos + 1), true);
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Finding the statement. An entry describes one firing statement: tag, source (top,
-- statement, sqlfunction, internal, unknown), query (the text to log), exact, reason.

CREATE OR REPLACE FUNCTION pgcapture.entry(
    tag text, source text, query text, exact boolean, reason text DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'tag', tag, 'source', source, 'query', query, 'exact', exact, 'reason', reason))
$fn$;

-- A statement of the client's query string: the first one after the last that fired which
-- fires event triggers. The statements' positions and tag prefixes are cached in the state.
CREATE OR REPLACE FUNCTION pgcapture.resolve_top(INOUT st jsonb, tag text, OUT e jsonb)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    src text := coalesce(current_query(), '');
    pos int := pgcapture.top_cursor(st ->> 'msg');
    nxt jsonb;
    hit jsonb;
    y jsonb;
BEGIN
    IF st -> 'top' IS NULL THEN
        st := st || jsonb_build_object('top', (
            SELECT coalesce(jsonb_agg(jsonb_build_array(x.n - 1, x.first, x.last, x.prefix)
                                      ORDER BY x.n) FILTER (WHERE x.prefix IS NOT NULL), '[]')
            FROM (SELECT row_number() OVER (ORDER BY s.first) AS n, s.first, s.last,
                         CASE WHEN (pgcapture.statement_words(s.body)).words[1] = 'execute'
                              THEN 'EXECUTE'
                              ELSE pgcapture.ddl_tag_prefix(s.body) END AS prefix
                  FROM pgcapture.statements(src) AS s) AS x));
    END IF;
    -- Whether an EXECUTE fires depends on its prepared statement when it runs (the string may
    -- prepare it after the cache was made). Only a SELECT INTO can be one: an EXECUTE that
    -- fired before another statement would have moved the cursor past it.
    FOR y IN SELECT x FROM jsonb_array_elements(st -> 'top') AS x
             WHERE (x ->> 0)::int > pos ORDER BY (x ->> 0)::int LOOP
        IF y ->> 3 = 'EXECUTE' THEN
            CONTINUE WHEN tag <> 'SELECT INTO';
            y := jsonb_set(y, '{3}', coalesce(to_jsonb(pgcapture.execute_tag_prefix(
                substr(src, (y ->> 1)::int, (y ->> 2)::int - (y ->> 1)::int + 1),
                (y ->> 1)::int)), 'null'));
            CONTINUE WHEN y ->> 3 IS NULL;
        END IF;
        nxt := y;
        EXIT;
    END LOOP;
    hit := CASE WHEN pgcapture.tag_matches(nxt ->> 3, tag) THEN nxt END;
    IF hit IS NULL THEN
        SELECT x INTO hit FROM jsonb_array_elements(st -> 'top') AS x
        WHERE (x ->> 0)::int > pos AND pgcapture.tag_matches(x ->> 3, tag)
        ORDER BY (x ->> 0)::int LIMIT 1;
    END IF;
    IF hit IS NOT NULL THEN
        PERFORM pgcapture.top_cursor_set(st ->> 'msg', (hit ->> 0)::int);
    END IF;
    IF nxt IS NULL THEN
        e := pgcapture.entry(tag, 'top', src, false,
                             'no statement left in the query string fires event triggers');
    ELSIF nxt = hit THEN
        e := pgcapture.entry(tag, 'top', substr(src, (nxt ->> 1)::int,
                                                (nxt ->> 2)::int - (nxt ->> 1)::int + 1), true)
             || jsonb_build_object('at', (nxt ->> 1)::int);
    ELSE
        e := pgcapture.entry(tag, 'top', src, false, format(
            'the next statement of the query string that fires event triggers is %s, not %s',
            nxt ->> 3, tag));
    END IF;
END
$fn$;

-- A statement of a text run through SPI (PL/pgSQL, EXECUTE, ...). When the text holds several
-- statements that fire event triggers (EXECUTE 'a; b'), a cursor per text in the state picks
-- the next one, starting over when the text is run again.
CREATE OR REPLACE FUNCTION pgcapture.resolve_nested(
    INOUT st jsonb, tag text, body text, source text, OUT e jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    stmts jsonb;
    key text := md5(body);
    pick int := 0;
BEGIN
    SELECT coalesce(jsonb_agg(jsonb_build_array(x.body, x.prefix) ORDER BY x.first), '[]')
    INTO stmts
    FROM (SELECT s.first, s.body, pgcapture.ddl_tag_prefix(s.body) AS prefix
          FROM pgcapture.statements(body) AS s) AS x
    WHERE x.prefix IS NOT NULL;
    IF jsonb_array_length(stmts) > 1 THEN
        pick := coalesce((st -> 'nested' ->> key)::int + 1, 0);
        pick := CASE WHEN pick < jsonb_array_length(stmts) THEN pick ELSE 0 END;
        st := jsonb_set(st, ARRAY['nested', key], to_jsonb(pick));
    END IF;
    IF pgcapture.tag_matches(stmts -> pick ->> 1, tag) THEN
        e := pgcapture.entry(tag, source, stmts -> pick ->> 0, true);
    ELSE
        e := pgcapture.entry(tag, source, body, false, format(
            'no statement of the text matches %s', tag));
    END IF;
END
$fn$;

-- A statement of a LANGUAGE sql function: the context names the function (not its schema or
-- arguments) and the statement's number in its body.
CREATE OR REPLACE FUNCTION pgcapture.resolve_sql_function(tag text, fname text, stmt_no int)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    texts text[];
BEGIN
    SELECT array_agg(DISTINCT x.stmt) INTO texts
    FROM (SELECT (pgcapture.split_statements(p.prosrc))[stmt_no] AS stmt
          FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
          WHERE l.lanname = 'sql' AND p.proname = fname AND p.prosqlbody IS NULL) AS x
    WHERE pgcapture.tag_matches(pgcapture.ddl_tag_prefix(x.stmt), tag);
    IF cardinality(texts) = 1 THEN
        RETURN pgcapture.entry(tag, 'sqlfunction', texts[1], true);
    END IF;
    RETURN pgcapture.entry(tag, 'sqlfunction', coalesce(texts[1], current_query()), false,
                           format('cannot tell which SQL function named %s ran the statement',
                                  quote_ident(fname)));
END
$fn$;

-- The entry for a firing statement, from the trigger function's PG_CONTEXT.
CREATE OR REPLACE FUNCTION pgcapture.resolve(INOUT st jsonb, ctx text, tag text, OUT e jsonb)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    f record := pgcapture.innermost_frame(ctx);
BEGIN
    IF f.kind = 'top' AND jsonb_array_length(st -> 'open') > 0 THEN
        -- run by the C code of an enclosing command, not by a statement of the query string
        e := pgcapture.entry(tag, 'internal', current_query(), false,
                             format('run inside %s', st -> 'open' -> -1 ->> 'tag'));
    ELSIF f.kind = 'top' THEN
        SELECT r.st, r.e INTO st, e FROM pgcapture.resolve_top(st, tag) AS r;
    ELSIF f.kind = 'statement' THEN
        SELECT r.st, r.e INTO st, e FROM pgcapture.resolve_nested(st, tag, f.body, f.kind) AS r;
        IF NOT f.clean THEN
            e := e || jsonb_build_object('exact', false, 'reason',
                                         'cannot delimit the statement in the call context');
        END IF;
    ELSIF f.kind = 'sqlfunction' THEN
        e := pgcapture.resolve_sql_function(tag, f.fname, f.stmt_no);
    ELSE
        e := pgcapture.entry(tag, 'unknown', current_query(), false,
                             format('unrecognised call context: %s', f.body));
    END IF;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- What to log.

-- Whether a collected object is temporary: objects of relations (triggers, rules, policies,
-- statistics) by their relation, relations by their persistence, others by their schema.
CREATE OR REPLACE FUNCTION pgcapture.is_temp_object(classid oid, objid oid, schema_name text)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(
        (SELECT c.relpersistence = 't' FROM pg_class AS c WHERE c.oid = CASE classid
             WHEN 'pg_class'::regclass THEN objid
             WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = objid)
             WHEN 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = objid)
             WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = objid)
             WHEN 'pg_statistic_ext'::regclass
                 THEN (SELECT stxrelid FROM pg_statistic_ext WHERE oid = objid)
             END),
        schema_name ~ '^pg_(toast_)?temp(_[0-9]+)?$',
        false)
$fn$;

-- The objects pg_event_trigger_ddl_commands() reports at ddl_command_end.
CREATE OR REPLACE FUNCTION pgcapture.collected_objects()
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'object_type', c.object_type, 'schema_name', c.schema_name,
               'object_identity', c.object_identity, 'in_extension', c.in_extension,
               'temporary', pgcapture.is_temp_object(c.classid, c.objid, c.schema_name))), '[]')
    FROM pg_event_trigger_ddl_commands() AS c
$fn$;

-- A DROP's entry given what sql_drop saw ("dropped"): NULL when every object it named was
-- temporary; rewritten to name only the others when it named both kinds (DROP OWNED is kept).
CREATE OR REPLACE FUNCTION pgcapture.drop_decision(e jsonb, tag text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    d jsonb := coalesce(e -> 'dropped', '[]');
    temps int;
    others text;
    cascade boolean;
BEGIN
    SELECT count(*) FILTER (WHERE (x ->> 'is_temporary')::boolean),
           string_agg(x ->> 'object_identity', ', ' ORDER BY n)
               FILTER (WHERE NOT (x ->> 'is_temporary')::boolean)
    INTO temps, others
    FROM jsonb_array_elements(d) WITH ORDINALITY AS o(x, n)
    WHERE (x ->> 'original')::boolean;
    IF temps = 0 OR tag = 'DROP OWNED' THEN
        RETURN e;
    ELSIF others IS NULL THEN
        RETURN NULL;
    END IF;
    -- dependent objects dropped by CASCADE that the replica must drop too
    SELECT EXISTS (SELECT FROM jsonb_array_elements(d) AS x
                   WHERE (x ->> 'normal')::boolean AND NOT (x ->> 'is_temporary')::boolean)
    INTO cascade;
    RETURN e || jsonb_build_object('rewritten', true, 'query', format(
        'DROP %s IF EXISTS %s%s', substr(tag, 6), others, CASE WHEN cascade THEN ' CASCADE' END));
END
$fn$;

-- The entry to log at ddl_command_end, or NULL when the statement only touched temporary
-- objects or objects of an extension being created.
CREATE OR REPLACE FUNCTION pgcapture.end_decision(e jsonb, tag text, objs jsonb, user_path text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF jsonb_array_length(objs) > 0 AND NOT EXISTS (
            SELECT FROM jsonb_array_elements(objs) AS o
            WHERE NOT ((o ->> 'in_extension')::boolean OR (o ->> 'temporary')::boolean)) THEN
        RETURN NULL;
    ELSIF tag LIKE 'DROP %' THEN
        RETURN pgcapture.drop_decision(e, tag);
    ELSIF jsonb_array_length(objs) = 0 AND (e ->> 'exact')::boolean
          AND pgcapture.names_temp_relation(e ->> 'query',
                                            pgcapture.creates_in_temp_schema(user_path)) THEN
        -- no objects reported (REFRESH MATERIALIZED VIEW hides those of its temporary tables,
        -- IF NOT EXISTS found one): judge from the text
        RETURN NULL;
    END IF;
    RETURN e;
END
$fn$;

-- Inserts the log row. activity has the Go extension's fields (from pg_stat_activity) and ours.
CREATE OR REPLACE FUNCTION pgcapture.write_log(e jsonb, phase text, objects jsonb, user_path text)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
    INSERT INTO pgcapture.ddl_logs (query, tags, activity)
    SELECT e ->> 'query', ARRAY[e ->> 'tag'], jsonb_build_object(
               'datname', a.datname, 'usename', a.usename,
               'application_name', a.application_name, 'client_addr', a.client_addr,
               'backend_start', a.backend_start, 'xact_start', a.xact_start,
               'top_level_query', current_query(), 'nested', e ->> 'source' <> 'top',
               'search_path', user_path,
               'settings', jsonb_build_object(
                   'TimeZone', current_setting('TimeZone'),
                   'DateStyle', current_setting('DateStyle'),
                   'IntervalStyle', current_setting('IntervalStyle'),
                   'standard_conforming_strings', current_setting('standard_conforming_strings'),
                   'default_tablespace', current_setting('default_tablespace'),
                   'default_table_access_method', current_setting('default_table_access_method'),
                   'default_toast_compression', current_setting('default_toast_compression')),
               'exact', coalesce((e ->> 'exact')::boolean, false), 'phase', phase,
               'objects', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                  'object_type', o ->> 'object_type',
                                  'schema_name', o ->> 'schema_name',
                                  'object_identity', o ->> 'object_identity')), '[]')
                           FROM jsonb_array_elements(objects) AS o))
           || jsonb_strip_nulls(jsonb_build_object('reason', e -> 'reason',
                                                   'rewritten', e -> 'rewritten',
                                                   'statement', e -> 'statement',
                                                   'effect', e -> 'effect'))
    FROM (SELECT 1) AS one
    LEFT JOIN pg_stat_activity AS a ON a.pid = pg_backend_pid();
$fn$;

-- ---------------------------------------------------------------------------------------------
-- CREATE TABLE AS and SELECT INTO by their effect. Their query can read what only the source's
-- session has (a prepared statement, temporary tables) or give other rows when run again
-- (volatile functions, data the replica lacks). So they are logged as the equivalent CREATE
-- TABLE with the columns the statement makes, and the rows follow in the stream (issue 14).

-- The significant tokens of `stmt` as in statement_words (w), with their first and last
-- character positions (f, l) and parenthesis depths (d).
CREATE OR REPLACE FUNCTION pgcapture.tokens(
    stmt text, OUT w text[], OUT f int[], OUT l int[], OUT d int[])
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t record;
    depth int := 0;
BEGIN
    w := '{}';
    f := '{}';
    l := '{}';
    d := '{}';
    FOR t IN SELECT * FROM pgcapture.lex(stmt) AS x WHERE x.kind <> 'comment' LOOP
        IF t.kind = 'op' AND t.word = ')' THEN
            depth := depth - 1;
        END IF;
        w := w || CASE t.kind WHEN 'word' THEN t.word WHEN 'op' THEN t.word
                              WHEN 'ident' THEN '"' || t.word ELSE '<' || t.kind || '>' END;
        f := f || t.first;
        l := l || t.last;
        d := d || depth;
        IF t.kind = 'op' AND t.word = '(' THEN
            depth := depth + 1;
        END IF;
    END LOOP;
END
$fn$;

-- The parts of a CREATE TABLE AS or SELECT INTO statement: head (CREATE ... TABLE [IF NOT
-- EXISTS] name, as written, or for SELECT INTO the CREATE [UNLOGGED] TABLE name it means), cols
-- (the column name list in parentheses, or ''), tail (the clauses between it and AS: USING,
-- WITH (...), TABLESPACE, ...) and query (the query whose result fills the table, without INTO
-- and WITH [NO] DATA). All NULL when the text does not have that form.
CREATE OR REPLACE FUNCTION pgcapture.table_as_parts(
    stmt text, OUT head text, OUT cols text, OUT tail text, OUT query text)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    tk record := pgcapture.tokens(stmt);
    w text[] := tk.w;
    f int[] := tk.f;
    l int[] := tk.l;
    d int[] := tk.d;
    n int := cardinality(tk.w);
    i int;
    j int;
    q int;
    unlogged boolean := false;
BEGIN
    IF w[1] = 'create' THEN
        -- CREATE [opts] TABLE [IF NOT EXISTS] name [(cols)] [tail] AS query [WITH [NO] DATA]
        i := array_position(w, 'table') + 1;
        IF w[i : i + 2] = '{if,not,exists}' THEN
            i := i + 3;
        END IF;
        WHILE w[i + 1] = '.' LOOP
            i := i + 2;
        END LOOP;
        head := left(stmt, l[i]);
        i := i + 1;
        cols := '';
        IF w[i] = '(' THEN
            j := i + 1;
            WHILE j <= n AND NOT (w[j] = ')' AND d[j] = d[i]) LOOP
                j := j + 1;
            END LOOP;
            cols := substr(stmt, f[i], l[j] - f[i] + 1);
            i := j + 1;
        END IF;
        j := i;
        WHILE j <= n AND NOT (w[j] = 'as' AND d[j] = 0) LOOP
            j := j + 1;
        END LOOP;
        IF j >= n THEN
            head := NULL;
            RETURN;
        END IF;
        tail := CASE WHEN j > i THEN substr(stmt, f[i], l[j - 1] - f[i] + 1) ELSE '' END;
        q := n;
        IF w[n] = 'data' AND w[n - 1] = 'with' THEN
            q := n - 2;
        ELSIF w[n] = 'data' AND w[n - 2 : n - 1] = '{with,no}' THEN
            q := n - 3;
        END IF;
        query := substr(stmt, f[j + 1], l[q] - f[j + 1] + 1);
    ELSE
        -- SELECT ... INTO [TEMP | UNLOGGED ...] [TABLE] name ...
        q := pgcapture.select_into_at(w, d);
        IF q IS NULL THEN
            RETURN;
        END IF;
        i := q + 1;
        WHILE w[i] IN ('unlogged', 'global', 'local', 'temp', 'temporary') LOOP
            unlogged := unlogged OR w[i] = 'unlogged';
            i := i + 1;
        END LOOP;
        IF w[i] = 'table' THEN
            i := i + 1;
        END IF;
        j := i;
        WHILE w[j + 1] = '.' LOOP
            j := j + 2;
        END LOOP;
        head := format('CREATE %sTABLE %s', CASE WHEN unlogged THEN 'UNLOGGED ' ELSE '' END,
                       substr(stmt, f[i], l[j] - f[i] + 1));
        cols := '';
        tail := '';
        query := left(stmt, f[q] - 1) || substr(stmt, l[j] + 1);
    END IF;
END
$fn$;

-- The query of a prepared statement run by `EXECUTE name [(args)]`, with its parameters
-- replaced by NULLs of their types (only the result's shape is wanted), or NULL. `before` is
-- where the statement with the EXECUTE starts in the client's query string, when known.
CREATE OR REPLACE FUNCTION pgcapture.prepared_query(execute_stmt text, before int DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    pname text;
    ps record;
    src text;
    t record;
    done int := 0;
    out text := '';
BEGIN
    SELECT x.word INTO pname FROM pgcapture.lex(execute_stmt) AS x
    WHERE x.kind <> 'comment' ORDER BY x.first OFFSET 1 LIMIT 1;
    SELECT * INTO ps FROM pg_prepared_statements AS p WHERE p.name = pname;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    src := ps.statement;
    IF ps.from_sql THEN
        -- the text is the whole query string that prepared it: the statement is its last
        -- PREPARE name [(types)] AS query, or when that string runs now, the last one before
        -- position `before`, where the EXECUTE is
        SELECT s.body INTO src FROM pgcapture.statements(ps.statement) AS s
        WHERE (pgcapture.statement_words(s.body)).words[1:2] IN (ARRAY['prepare', pname],
                                                               ARRAY['prepare', '"' || pname])
          AND (before IS NULL OR ps.statement IS DISTINCT FROM current_query()
               OR s.first < before)
        ORDER BY s.first DESC
        LIMIT 1;
        SELECT x.last INTO done FROM pgcapture.lex(src) AS x
        WHERE x.kind = 'word' AND x.word = 'as' ORDER BY x.first LIMIT 1;
        src := substr(src, done + 1);
    END IF;
    done := 0;
    FOR t IN SELECT * FROM pgcapture.lex(src) AS x WHERE x.kind = 'param' ORDER BY x.first LOOP
        out := out || substr(src, done + 1, t.first - done - 1) || format('(NULL::%s)',
            ps.parameter_types[substr(src, t.first + 1, t.last - t.first)::int]);
        done := t.last;
    END LOOP;
    RETURN out || substr(src, done + 1);
END
$fn$;

-- The entry `e` of a CREATE TABLE AS / SELECT INTO with `query` replaced by the CREATE TABLE it
-- amounts to, and the statement as written kept in `statement`. The columns come from a view
-- over the same query, made and dropped in this transaction with the user's search path: the
-- server gives its columns the names, types, type modifiers and collations it gives the new
-- table's, and only parses the query (nothing is run, which matters since this function runs
-- as its owner). The view is made in schema pgcapture, not as a temporary one: a transaction
-- that touched a temporary object cannot be prepared (PREPARE TRANSACTION), and a CREATE TABLE
-- AS must not lose that. Only a query that reads temporary tables (its transaction touched
-- them already) gets a temporary view. Unchanged when the statement has another form or the
-- view cannot be made.
CREATE OR REPLACE FUNCTION pgcapture.table_as_effect(e jsonb, user_path text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    p record;
    q text;
    shape text := format('pgcapture.%I', 'shape_' || pg_backend_pid());
    columns text;
    role text := current_setting('session_replication_role');
    notices text;
    view text;
BEGIN
    p := pgcapture.table_as_parts(e ->> 'query');
    q := p.query;
    IF p.head IS NULL THEN
        RETURN e;
    ELSIF (pgcapture.statement_words(q)).words[1] = 'execute' THEN
        q := pgcapture.prepared_query(q, (e ->> 'at')::int);
    END IF;
    IF q IS NULL THEN
        RETURN e;
    END IF;
    -- Event triggers (other ones too) do not fire for the view while the session replication
    -- role is replica. Without the privilege to set it, they see it come and go.
    BEGIN
        PERFORM set_config('session_replication_role', 'replica', true);
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
    view := format('CREATE VIEW %s %s AS %s', shape, p.cols, q);
    -- The text runs as this function's owner: it must be one statement that only makes the
    -- view. A semicolon (the only separator of statements) never belongs in it.
    IF EXISTS (SELECT FROM pgcapture.lex(view) AS x
               WHERE (x.kind = 'op' AND x.word = ';') OR x.kind = 'error') THEN
        RETURN e;
    END IF;
    PERFORM set_config('search_path', user_path, true);
    notices := current_setting('client_min_messages');
    PERFORM set_config('client_min_messages', 'warning', true);  -- "will be a temporary view"
    BEGIN
        EXECUTE view;
    EXCEPTION WHEN invalid_table_definition THEN
        -- "cannot create temporary relation in non-temporary schema": the query reads a
        -- temporary table
        shape := format('pg_temp.%I', 'pgcapture_shape_' || pg_backend_pid());
        EXECUTE format('CREATE TEMP VIEW %s %s AS %s', shape, p.cols, q);
    END;
    PERFORM set_config('client_min_messages', notices, true);
    PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
    SELECT string_agg(format('%I %s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                             CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
                                  THEN format(' COLLATE %I.%I', cn.nspname, co.collname) END),
                      ', ' ORDER BY a.attnum)
    INTO columns
    FROM pg_attribute AS a
    JOIN pg_type AS ty ON ty.oid = a.atttypid
    LEFT JOIN pg_collation AS co ON co.oid = a.attcollation
    LEFT JOIN pg_namespace AS cn ON cn.oid = co.collnamespace
    WHERE a.attrelid = shape::regclass AND a.attnum > 0 AND NOT a.attisdropped;
    EXECUTE format('DROP VIEW %s', shape);
    PERFORM set_config('session_replication_role', role, true);
    RETURN e || jsonb_build_object(
        'statement', e ->> 'query', 'effect', true,
        'query', format('%s (%s)%s', p.head, coalesce(columns, ''),
                        CASE WHEN p.tail <> '' THEN ' ' || p.tail ELSE '' END));
EXCEPTION WHEN OTHERS THEN
    RETURN e;  -- logged as written: a replica runs the query itself
END
$fn$;

-- Whether the CREATE TABLE statement `stmt` copies a temporary table with LIKE: the replica has
-- no such table. Names resolve with the user's search path.
CREATE OR REPLACE FUNCTION pgcapture.likes_temp_table(stmt text, user_path text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    tk record := pgcapture.tokens(stmt);
    j int;
    rel regclass;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(tk.w), 0) LOOP
        CONTINUE WHEN tk.w[i] <> 'like' OR tk.d[i] <> 1;
        j := i + 1;
        WHILE tk.w[j + 1] = '.' LOOP
            j := j + 2;
        END LOOP;
        PERFORM set_config('search_path', user_path, true);
        rel := to_regclass(substr(stmt, tk.f[i + 1], tk.l[j] - tk.f[i + 1] + 1));
        PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
        IF (SELECT c.relpersistence = 't' FROM pg_class AS c WHERE c.oid = rel) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$fn$;

-- The statements that make table `rel` as the catalog holds it: CREATE TABLE with its columns
-- (types, collations, defaults, generated and identity columns, NOT NULL), constraints,
-- parents, partition key, persistence, access method, storage parameters and tablespace; then
-- its other indexes, column storage and compression, extended statistics and comments. Names
-- are qualified (the search path is pg_catalog, pg_temp).
CREATE OR REPLACE FUNCTION pgcapture.table_definition(rel oid)
RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    c record;
    name text;
    elements text;
    out text[];
BEGIN
    SELECT r.*, n.nspname, a.amname INTO c
    FROM pg_class AS r JOIN pg_namespace AS n ON n.oid = r.relnamespace
    LEFT JOIN pg_am AS a ON a.oid = r.relam
    WHERE r.oid = rel;
    name := format('%I.%I', c.nspname, c.relname);
    SELECT string_agg(x.def, ', ' ORDER BY x.ord) INTO elements FROM (
        SELECT a.attnum AS ord, format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod))
            || CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
                    THEN format(' COLLATE %I.%I', cn.nspname, co.collname) ELSE '' END
            || CASE WHEN a.attgenerated = 's'
                    THEN format(' GENERATED ALWAYS AS (%s) STORED', pg_get_expr(d.adbin, d.adrelid))
                    WHEN d.adbin IS NOT NULL THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid)
                    ELSE '' END
            || CASE WHEN a.attidentity IN ('a', 'd') THEN format(
                   ' GENERATED %s AS IDENTITY (START WITH %s INCREMENT BY %s MINVALUE %s '
                   'MAXVALUE %s CACHE %s%s)',
                   CASE a.attidentity WHEN 'a' THEN 'ALWAYS' ELSE 'BY DEFAULT' END,
                   sq.seqstart, sq.seqincrement, sq.seqmin, sq.seqmax, sq.seqcache,
                   CASE WHEN sq.seqcycle THEN ' CYCLE' ELSE ' NO CYCLE' END) ELSE '' END
            || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END AS def
        FROM pg_attribute AS a
        JOIN pg_type AS ty ON ty.oid = a.atttypid
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_collation AS co ON co.oid = a.attcollation
        LEFT JOIN pg_namespace AS cn ON cn.oid = co.collnamespace
        LEFT JOIN pg_depend AS dp ON dp.refclassid = 'pg_class'::regclass
             AND dp.refobjid = a.attrelid AND dp.refobjsubid = a.attnum AND dp.deptype = 'i'
             AND dp.classid = 'pg_class'::regclass
        LEFT JOIN pg_sequence AS sq ON sq.seqrelid = dp.objid
        WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attislocal
        UNION ALL
        SELECT 100000 + row_number() OVER (ORDER BY k.conname),
               format('CONSTRAINT %I %s', k.conname, pg_get_constraintdef(k.oid))
        FROM pg_constraint AS k
        WHERE k.conrelid = rel AND k.conislocal AND k.contype IN ('c', 'p', 'u', 'f', 'x')
    ) AS x;
    out := ARRAY[format('CREATE %sTABLE %s (%s)%s%s%s%s%s',
        CASE c.relpersistence WHEN 'u' THEN 'UNLOGGED ' ELSE '' END, name,
        coalesce(elements, ''),
        (SELECT ' INHERITS (' || string_agg(i.inhparent::regclass::text, ', '
                                            ORDER BY i.inhseqno) || ')'
         FROM pg_inherits AS i WHERE i.inhrelid = rel),
        CASE WHEN c.relkind = 'p' THEN ' PARTITION BY ' || pg_get_partkeydef(rel) ELSE '' END,
        CASE WHEN c.relkind = 'r' THEN format(' USING %I', c.amname) ELSE '' END,
        ' WITH (' || array_to_string(c.reloptions, ', ') || ')',
        CASE WHEN c.reltablespace <> 0
             THEN format(' TABLESPACE %I', (SELECT spcname FROM pg_tablespace
                                            WHERE oid = c.reltablespace)) ELSE '' END)];
    -- an identity sequence of another type than its column's (LIKE makes them bigint)
    out := out || ARRAY(
        SELECT format('ALTER SEQUENCE %s AS %s MINVALUE %s MAXVALUE %s', sq.seqrelid::regclass,
                      format_type(sq.seqtypid, NULL), sq.seqmin, sq.seqmax)
        FROM pg_attribute AS a
        JOIN pg_depend AS dp ON dp.refclassid = 'pg_class'::regclass AND dp.refobjid = rel
             AND dp.refobjsubid = a.attnum AND dp.deptype = 'i'
             AND dp.classid = 'pg_class'::regclass
        JOIN pg_sequence AS sq ON sq.seqrelid = dp.objid
        WHERE a.attrelid = rel AND a.attidentity IN ('a', 'd') AND sq.seqtypid <> a.atttypid
        ORDER BY a.attnum);
    out := out || ARRAY(
        SELECT pg_get_indexdef(i.indexrelid) FROM pg_index AS i
        WHERE i.indrelid = rel
          AND NOT EXISTS (SELECT FROM pg_constraint AS k WHERE k.conindid = i.indexrelid
                                                           AND k.conrelid = rel)
        ORDER BY i.indexrelid);
    out := out || ARRAY(
        SELECT format('ALTER TABLE %s ALTER COLUMN %I SET STORAGE %s', name, a.attname,
                      CASE a.attstorage WHEN 'p' THEN 'PLAIN' WHEN 'e' THEN 'EXTERNAL'
                                        WHEN 'm' THEN 'MAIN' ELSE 'EXTENDED' END)
        FROM pg_attribute AS a JOIN pg_type AS ty ON ty.oid = a.atttypid
        WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attstorage <> ty.typstorage
        ORDER BY a.attnum);
    out := out || ARRAY(
        SELECT format('ALTER TABLE %s ALTER COLUMN %I SET COMPRESSION %s', name, a.attname,
                      CASE a.attcompression WHEN 'l' THEN 'lz4' ELSE 'pglz' END)
        FROM pg_attribute AS a
        WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attcompression <> ''
        ORDER BY a.attnum);
    out := out || ARRAY(
        SELECT pg_get_statisticsobjdef(s.oid) FROM pg_statistic_ext AS s
        WHERE s.stxrelid = rel ORDER BY s.oid);
    out := out || ARRAY(
        SELECT CASE WHEN d.objsubid = 0 THEN format('COMMENT ON TABLE %s IS %L', name, d.description)
                    ELSE format('COMMENT ON COLUMN %s.%I IS %L', name,
                                (SELECT attname FROM pg_attribute
                                 WHERE attrelid = rel AND attnum = d.objsubid), d.description) END
        FROM pg_description AS d
        WHERE d.classoid = 'pg_class'::regclass AND d.objoid = rel
        ORDER BY d.objsubid);
    out := out || ARRAY(
        SELECT format('COMMENT ON CONSTRAINT %I ON %s IS %L', k.conname, name, d.description)
        FROM pg_constraint AS k
        JOIN pg_description AS d ON d.classoid = 'pg_constraint'::regclass AND d.objoid = k.oid
        WHERE k.conrelid = rel ORDER BY k.conname);
    out := out || ARRAY(
        SELECT format('COMMENT ON INDEX %I.%I IS %L', c.nspname, ic.relname, d.description)
        FROM pg_index AS i JOIN pg_class AS ic ON ic.oid = i.indexrelid
        JOIN pg_description AS d ON d.classoid = 'pg_class'::regclass AND d.objoid = i.indexrelid
        WHERE i.indrelid = rel
          AND NOT EXISTS (SELECT FROM pg_constraint AS k WHERE k.conindid = i.indexrelid
                                                           AND k.conrelid = rel)
        ORDER BY ic.relname);
    RETURN out;
END
$fn$;

-- One statement that runs `stmts` in order: the statement itself when there is one, else a DO
-- block (a replica runs one statement per row).
CREATE OR REPLACE FUNCTION pgcapture.one_statement(stmts text[])
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    body text;
    tag text := 'pgcapture';
    n int := 0;
BEGIN
    IF cardinality(stmts) = 1 THEN
        RETURN stmts[1];
    END IF;
    SELECT string_agg(format('EXECUTE %s;', quote_literal(s)), ' ' ORDER BY o) INTO body
    FROM unnest(stmts) WITH ORDINALITY AS x(s, o);
    WHILE strpos(body, '$' || tag || '$') > 0 LOOP
        n := n + 1;
        tag := 'pgcapture' || n;
    END LOOP;
    RETURN format('DO $%s$ BEGIN %s END $%s$', tag, body, tag);
END
$fn$;

-- A CREATE TABLE that copies a temporary table with LIKE, by its effect: the statements that
-- make the table as the catalog holds it now (`e` unchanged otherwise, or on any error).
CREATE OR REPLACE FUNCTION pgcapture.create_table_effect(e jsonb, user_path text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rel oid;
BEGIN
    IF NOT (e ->> 'exact')::boolean OR NOT pgcapture.likes_temp_table(e ->> 'query', user_path) THEN
        RETURN e;
    END IF;
    SELECT c.objid INTO rel FROM pg_event_trigger_ddl_commands() AS c
    JOIN pg_class AS r ON r.oid = c.objid
    WHERE c.classid = 'pg_class'::regclass AND r.relkind IN ('r', 'p')
    LIMIT 1;
    IF rel IS NULL THEN
        RETURN e;  -- IF NOT EXISTS found the table: nothing was made
    END IF;
    RETURN e || jsonb_build_object('statement', e ->> 'query', 'effect', true,
                                   'query', pgcapture.one_statement(pgcapture.table_definition(rel)));
EXCEPTION WHEN OTHERS THEN
    RETURN e;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- ALTER TABLE ... ADD COLUMN ... DEFAULT <not immutable>. Such a default is computed once, by
-- the ALTER, and stored for the existing rows without rewriting the table (`attmissingval`):
-- now(), current_user, current_setting(...) give a replica other values, and no row change
-- carries the source's. The row is logged with a statement setting the source's value after it.

-- Whether a default expression (pg_attrdef.adbin) calls anything that is not immutable: a
-- function or operator marked stable or volatile, or an SQL value function (CURRENT_USER,
-- CURRENT_TIMESTAMP, ...).
CREATE OR REPLACE FUNCTION pgcapture.default_is_stable(adbin pg_node_tree)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT strpos(adbin::text, '{SQLVALUEFUNCTION') > 0 OR EXISTS (
        SELECT FROM regexp_matches(adbin::text, ':(?:func|opfunc)id ([0-9]+)', 'g') AS m
        JOIN pg_proc AS p ON p.oid = m[1]::oid
        WHERE p.provolatile <> 'i')
$fn$;

-- The table an ALTER TABLE statement names, with the user's search path, or NULL.
CREATE OR REPLACE FUNCTION pgcapture.alter_table_target(stmt text, user_path text)
RETURNS oid
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    tk record := pgcapture.tokens(stmt);
    i int := 3;
    j int;
    rel oid;
BEGIN
    IF tk.w[1:2] IS DISTINCT FROM '{alter,table}' THEN
        RETURN NULL;
    END IF;
    IF tk.w[i : i + 1] = '{if,exists}' THEN
        i := i + 2;
    END IF;
    IF tk.w[i] = 'only' THEN
        i := i + 1;
    END IF;
    j := i;
    WHILE tk.w[j + 1] = '.' LOOP
        j := j + 2;
    END LOOP;
    PERFORM set_config('search_path', user_path, true);
    rel := to_regclass(substr(stmt, tk.f[i], tk.l[j] - tk.f[i] + 1));
    PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
    RETURN rel;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$fn$;

-- At ddl_command_start of an ALTER TABLE that may add a column with a default: its table and
-- the highest column number it has before.
CREATE OR REPLACE FUNCTION pgcapture.start_alter_table(e jsonb, user_path text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rel oid;
BEGIN
    IF NOT coalesce((e ->> 'exact')::boolean, false)
       OR strpos(lower(e ->> 'query'), 'default') = 0 THEN
        RETURN e;
    END IF;
    rel := pgcapture.alter_table_target(e ->> 'query', user_path);
    IF rel IS NULL THEN
        RETURN e;
    END IF;
    RETURN e || jsonb_build_object('table', rel, 'columns', (
        SELECT coalesce(max(attnum), 0) FROM pg_attribute WHERE attrelid = rel AND attnum > 0));
END
$fn$;

-- At ddl_command_end: the entry with `query` running the statement, then setting the columns
-- it added with a default that is not immutable to the value the source stored for the existing
-- rows (as a literal of the column's type, read under the session's settings, which a replica
-- runs the row with).
CREATE OR REPLACE FUNCTION pgcapture.alter_table_effect(e jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rel oid := (e ->> 'table')::oid;
    added name[];
    r record;
    c record;
    lit text;
    sets text[];
    stmts text[] := ARRAY[e ->> 'query'];
BEGIN
    SELECT array_agg(a.attname) INTO added FROM pg_attribute AS a
    WHERE a.attrelid = rel AND a.attnum > (e ->> 'columns')::int AND NOT a.attisdropped;
    -- the table and its partitions or children: each stored its own missing values
    FOR r IN WITH RECURSIVE tree (relid) AS (
                 SELECT rel
                 UNION SELECT i.inhrelid FROM pg_inherits AS i JOIN tree ON i.inhparent = tree.relid)
             SELECT relid FROM tree LOOP
        sets := '{}';
        FOR c IN SELECT a.attname, a.attmissingval::text AS missing,
                        format_type(a.atttypid, a.atttypmod) AS typ
                 FROM pg_attribute AS a
                 JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                 WHERE a.attrelid = r.relid AND a.attname = ANY (added)
                   AND (r.relid = rel OR NOT a.attislocal)  -- not a child's own column
                   AND NOT a.attisdropped AND a.atthasmissing AND a.attgenerated = ''
                   AND pgcapture.default_is_stable(d.adbin)
                 ORDER BY a.attnum LOOP
            EXECUTE format('SELECT (%L::%s[])[1]::text', c.missing, c.typ) INTO lit;
            sets := sets || format('%I = %L::%s', c.attname, lit, c.typ);
        END LOOP;
        IF cardinality(sets) > 0 THEN
            stmts := stmts || format('UPDATE ONLY %s SET %s', r.relid::regclass,
                                     array_to_string(sets, ', '));
        END IF;
    END LOOP;
    IF cardinality(stmts) = 1 THEN
        RETURN e;
    END IF;
    RETURN e || jsonb_build_object('statement', e ->> 'query', 'effect', true,
                                   'query', pgcapture.one_statement(stmts));
EXCEPTION WHEN OTHERS THEN
    RETURN e;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Handlers, called by the event trigger functions with the safe search_path set.

-- Whether an enclosing open statement is running an extension's script.
CREATE OR REPLACE FUNCTION pgcapture.in_extension_script(st jsonb)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT EXISTS (SELECT FROM jsonb_array_elements(st -> 'open') AS x
                   WHERE x ->> 'tag' IN ('CREATE EXTENSION', 'ALTER EXTENSION'))
$fn$;

-- CREATE TABLE AS and SELECT INTO are logged at ddl_command_start, so that the row precedes
-- the new table's rows in the WAL; unless they create a temporary table. Those run inside
-- another command are judged at ddl_command_end from the created table instead.
CREATE OR REPLACE FUNCTION pgcapture.start_table_as(e jsonb, user_path text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    written text := e ->> 'query';
    exact boolean := (e ->> 'exact')::boolean;
BEGIN
    IF exact AND (pgcapture.statement_words(written)).words[1] = 'execute' THEN
        -- EXECUTE of a prepared SELECT INTO: judged by the prepared query
        e := e || jsonb_build_object('query',
                                     pgcapture.prepared_query(written, (e ->> 'at')::int));
    END IF;
    IF e ->> 'source' = 'internal' THEN
        RETURN e;
    ELSIF exact AND pgcapture.names_temp_relation(
            e ->> 'query', pgcapture.creates_in_temp_schema(user_path)) THEN
        RETURN e || '{"skip": "temporary"}';
    ELSIF exact THEN
        e := pgcapture.table_as_effect(e, user_path);
        IF e ? 'effect' THEN
            e := e || jsonb_build_object('statement', written);
        ELSIF e ->> 'query' IS DISTINCT FROM written THEN
            e := e || jsonb_build_object('query', written, 'exact', false, 'reason',
                'cannot tell the columns of the table made by EXECUTE of a prepared SELECT INTO');
        END IF;
    END IF;
    PERFORM pgcapture.write_log(e, 'start', '[]', user_path);
    RETURN e || '{"logged": true}';
END
$fn$;

CREATE OR REPLACE FUNCTION pgcapture.handle_start(ctx text, tag text, user_path text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    st jsonb := pgcapture.state_load();
    e jsonb;
BEGIN
    IF pgcapture.in_extension_script(st) THEN
        e := jsonb_build_object('tag', tag, 'skip', 'extension');
    ELSE
        SELECT r.st, r.e INTO st, e FROM pgcapture.resolve(st, ctx, tag) AS r;
        IF tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
            e := pgcapture.start_table_as(e, user_path);
        ELSIF tag = 'ALTER TABLE' THEN
            e := pgcapture.start_alter_table(e, user_path);
        END IF;
    END IF;
    PERFORM pgcapture.state_save(jsonb_set(st, '{open}', (st -> 'open') || jsonb_build_array(e)));
END
$fn$;

-- sql_drop: remembers the dropped objects in the open statement's entry for ddl_command_end.
CREATE OR REPLACE FUNCTION pgcapture.handle_sql_drop()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    st jsonb := pgcapture.state_load();
BEGIN
    IF jsonb_array_length(st -> 'open') = 0 THEN
        RETURN;
    END IF;
    PERFORM pgcapture.state_save(jsonb_set(st, '{open, -1, dropped}', (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'object_type', d.object_type, 'schema_name', d.schema_name,
                   'object_identity', d.object_identity, 'original', d.original,
                   'normal', d.normal, 'is_temporary', d.is_temporary)), '[]')
        FROM pg_event_trigger_dropped_objects() AS d)));
END
$fn$;

CREATE OR REPLACE FUNCTION pgcapture.handle_end(ctx text, tag text, user_path text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    st jsonb := pgcapture.state_load();
    e jsonb := st -> 'open' -> -1;
    objs jsonb;
BEGIN
    IF e ->> 'tag' IS DISTINCT FROM tag THEN
        SELECT r.st, r.e INTO st, e FROM pgcapture.resolve(st, ctx, tag) AS r;
        e := e || '{"exact": false, "reason": "no ddl_command_start was seen for the statement"}';
    ELSE
        st := st #- '{open, -1}';
    END IF;
    PERFORM pgcapture.state_save(st);
    -- subscriptions are this server's replication settings, not schema, and their connection
    -- strings may hold passwords
    IF e ? 'skip' OR e ? 'logged' OR tag LIKE '% SUBSCRIPTION' THEN
        RETURN;
    END IF;
    objs := pgcapture.collected_objects();
    e := pgcapture.end_decision(e, tag, objs, user_path);
    IF tag = 'CREATE TABLE' AND strpos(lower(e ->> 'query'), 'like') > 0 THEN
        e := pgcapture.create_table_effect(e, user_path);
    ELSIF tag = 'ALTER TABLE' AND e ? 'table' THEN
        e := pgcapture.alter_table_effect(e);
    END IF;
    IF e IS NOT NULL THEN
        PERFORM pgcapture.write_log(e, 'end', CASE WHEN tag LIKE 'DROP %'
                                                   THEN coalesce(e -> 'dropped', '[]')
                                                   ELSE objs END, user_path);
    END IF;
END
$fn$;

-- When a handler fails (a bug, a damaged install), the DDL must still succeed and must still be
-- logged: log the whole query string with exact = false; warn when even that fails.
CREATE OR REPLACE FUNCTION pgcapture.handle_failure(phase text, tag text, err text,
                                                    user_path text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    e jsonb := pgcapture.entry(tag, 'unknown', coalesce(current_query(), ''), false,
                               format('the %s handler failed: %s', phase, err));
    st jsonb;
    top jsonb;
BEGIN
    st := pgcapture.state_load();
    IF phase = 'start' THEN
        IF tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
            PERFORM pgcapture.write_log(e, 'start', '[]', user_path);
            e := e || '{"logged": true}';
        END IF;
        PERFORM pgcapture.state_save(
            jsonb_set(st, '{open}', (st -> 'open') || jsonb_build_array(e)));
    ELSIF phase = 'end' THEN
        top := st -> 'open' -> -1;
        IF top ->> 'tag' = tag THEN
            PERFORM pgcapture.state_save(st #- '{open, -1}');
        END IF;
        IF NOT coalesce(top ->> 'tag' = tag AND (top ? 'skip' OR top ? 'logged'), false) THEN
            PERFORM pgcapture.write_log(e, 'end', '[]', user_path);
        END IF;
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pgcapture did not log DDL statement %: % (then: %)', tag, err, SQLERRM
        USING HINT = 'replicas will miss this statement; reinstall the DDL capture to repair it';
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Event trigger functions. They run as their owner (inserting into ddl_logs needs no grant to
-- the users running DDL) with search_path pg_catalog, pg_temp; that is set and restored in the
-- body rather than by a SET clause so that the user's search path can be read (it decides
-- whether an unqualified CREATE TABLE AS makes a temporary table). Until then only
-- schema-qualified names are used. Errors never escape: they would fail the user's DDL.

CREATE OR REPLACE FUNCTION pgcapture.on_ddl_command_start()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    ctx text;
    user_path text;
BEGIN
    GET DIAGNOSTICS ctx = PG_CONTEXT;
    user_path := pg_catalog.current_setting('search_path');
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    BEGIN
        PERFORM pgcapture.handle_start(ctx, tg_tag, user_path);
    EXCEPTION WHEN OTHERS THEN
        PERFORM pgcapture.handle_failure('start', tg_tag, SQLERRM, user_path);
    END;
    PERFORM pg_catalog.set_config('search_path', user_path, true);
END
$fn$;

CREATE OR REPLACE FUNCTION pgcapture.on_sql_drop()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    user_path text;
BEGIN
    user_path := pg_catalog.current_setting('search_path');
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    BEGIN
        PERFORM pgcapture.handle_sql_drop();
    EXCEPTION WHEN OTHERS THEN
        -- without the dropped objects ddl_command_end logs the DROP as written: nothing is lost
        NULL;
    END;
    PERFORM pg_catalog.set_config('search_path', user_path, true);
END
$fn$;

CREATE OR REPLACE FUNCTION pgcapture.on_ddl_command_end()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    ctx text;
    user_path text;
BEGIN
    GET DIAGNOSTICS ctx = PG_CONTEXT;
    user_path := pg_catalog.current_setting('search_path');
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    BEGIN
        PERFORM pgcapture.handle_end(ctx, tg_tag, user_path);
    EXCEPTION WHEN OTHERS THEN
        PERFORM pgcapture.handle_failure('end', tg_tag, SQLERRM, user_path);
    END;
    PERFORM pg_catalog.set_config('search_path', user_path, true);
END
$fn$;

-- Helpers are for the trigger functions (which run as the owner); users get nothing here.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgcapture FROM PUBLIC;

CREATE EVENT TRIGGER pgcapture_ddl_command_start ON ddl_command_start
    EXECUTE FUNCTION pgcapture.on_ddl_command_start();
CREATE EVENT TRIGGER pgcapture_sql_drop ON sql_drop
    EXECUTE FUNCTION pgcapture.on_sql_drop();
CREATE EVENT TRIGGER pgcapture_ddl_command_end ON ddl_command_end
    EXECUTE FUNCTION pgcapture.on_ddl_command_end();
