# bash completion for qdirty (installed as qdirty by scripts/install.sh).

_qdirty() {
    local cur prev cmd opts
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD - 1]}
    if [ "$COMP_CWORD" -eq 1 ]; then
        mapfile -t COMPREPLY < <(compgen -W "info bitmap dump check create --help --version" -- "$cur")
        return 0
    fi
    cmd=${COMP_WORDS[1]}
    case "$cmd" in
        info) opts="--help --format --image-opts --force-share --output --count" ;;
        bitmap) opts="--help --add --remove --clear --enable --disable --merge --granularity
                      --source-file --source-format --format --image-opts --object" ;;
        dump) opts="--help --format --image-opts --force-share --output --union
                    --skip-inconsistent" ;;
        check) opts="--help --format --image-opts --force-share --repair --remove-inconsistent
                     --salvage --remove-broken --drop-bitmaps --output" ;;
        create) opts="--help --format --quiet -o" ;;
        *) return 0 ;;
    esac
    case "$prev" in
        -f | --format | -F | --source-format)
            mapfile -t COMPREPLY < <(compgen -W "qcow2 raw" -- "$cur")
            return 0
            ;;
        --output)
            mapfile -t COMPREPLY < <(compgen -W "human json" -- "$cur")
            return 0
            ;;
        -r | --repair)
            if [ "$cmd" = check ]; then
                mapfile -t COMPREPLY < <(compgen -W "leaks" -f -- "$cur")
                return 0
            fi
            ;;
        -o)
            mapfile -t COMPREPLY < <(compgen -W "cluster_size=" -- "$cur")
            compopt -o nospace 2>/dev/null
            return 0
            ;;
        -g | --granularity | --merge | --object)
            return 0
            ;;
    esac
    case "$cur" in
        --output=*)
            mapfile -t COMPREPLY < <(compgen -P --output= -W "human json" -- "${cur#--output=}")
            return 0
            ;;
        -*)
            # shellcheck disable=SC2086 # the option list is split on purpose
            mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
            return 0
            ;;
    esac
    # Image files (and directories to descend into).
    mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    compopt -o filenames 2>/dev/null
    return 0
}

complete -F _qdirty qdirty
